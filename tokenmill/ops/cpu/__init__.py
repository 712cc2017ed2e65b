"""Compiled CPU kernels (C + OpenMP, loaded with ctypes) for the hot loops PyTorch has no fused op for.

Every kernel here has a pure-PyTorch reference it is tested against; when no C compiler is available
the callers fall back to that reference (see `build.load_library`)."""
