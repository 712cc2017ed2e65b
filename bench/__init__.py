"""Benchmark scripts (run as files) and the GPU suite package `bench.gpu_suite` (run as `python -m bench.gpu_suite`
from the repository root; a regular package, so no other installed `bench` can shadow it)."""
