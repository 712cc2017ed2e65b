"""Build-on-first-use of the C kernels in `csrc/`, cached per source, compiler and CPU.

The shared object is compiled with the host's gcc (`-O3 -march=native -fopenmp`) into
`~/.cache/tokenmill/kernels/` the first time it is needed (about a second), then loaded with ctypes.
OpenMP resolves to the libgomp torch has already loaded, so the kernels share torch's thread pool.
When no compiler is found or the build fails, `load_library` returns None and the callers use their
PyTorch reference; `build_error` says why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# compile flags; the link step gets no -ffast-math: gcc would link crtfastmath.o, which turns on
# flush-to-zero for the whole process when the library loads (changing torch's float results)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=gnu11", "-ffast-math", "-fno-finite-math-only", "-Wall"]
LINK_FLAGS = ["-shared", "-fopenmp"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenmill" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _compiler() -> Optional[str]:
    for name in ("gcc", "cc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _source_text(src: Path) -> str:
    """The source with every local `#include "file"` it pulls in (recursively): what the build key hashes."""
    parts, seen, todo = [], set(), [src]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        text = path.read_text()
        parts.append(text)
        todo.extend(path.parent / name for name in re.findall(r'^#include "([^"]+)"', text, flags=re.M))
    return "\0".join(parts)


@functools.lru_cache(maxsize=None)
def _build(name: str) -> tuple[Optional[ctypes.CDLL], str]:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None, f"C kernels are built for Linux x86_64/aarch64 only (this is {platform.system()} {platform.machine()})"
    src = CSRC / f"{name}.c"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (gcc/cc/clang) found"
    flags = list(FLAGS)
    if platform.machine() == "aarch64":
        flags[1] = "-mcpu=native"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed: {e}"
    key = hashlib.sha256("\0".join([_source_text(src), " ".join(flags + LINK_FLAGS), version,
                                     _cpu_signature()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            obj = tmp + ".o"
            res = subprocess.run([cc, *flags, "-c", str(src), "-o", obj], capture_output=True, text=True, timeout=300)
            if res.returncode == 0:
                res = subprocess.run([cc, *LINK_FLAGS, obj, "-o", tmp, "-lm"], capture_output=True, text=True,
                                     timeout=300)
            if os.path.exists(obj):
                os.unlink(obj)
            if res.returncode != 0:
                return None, f"compiling {src.name} failed: {res.stderr.strip().splitlines()[-1:] or res.returncode}"
            os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"compiling {src.name} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        import torch  # noqa: F401  (load torch's libgomp first, so the kernels share its OpenMP runtime)
        return ctypes.CDLL(str(out)), ""
    except OSError as e:
        return None, f"loading {out.name} failed: {e}"


def load_library(name: str) -> Optional[ctypes.CDLL]:
    """The compiled `csrc/<name>.c`, or None (with a one-time warning) when it cannot be built."""
    lib, err = _build(name)
    if lib is None:
        log.warning("CPU kernels %r unavailable (%s); using the PyTorch reference", name, err)
    return lib


def build_error(name: str) -> str:
    """Why `load_library(name)` returned None ('' when it loaded)."""
    return _build(name)[1]
