"""Build-on-first-use of the C kernels in `csrc/`, cached per source, compiler and CPU.

A kernel library is one shared object linked from one or more translation units (`LIBRARIES`: `layer` chains
the rmsnorm, qlinear and attention units); the units share only headers (`simd.h`, `quant.h`, `kernels.h`).
It is compiled with the host's gcc (`-O3 -march=native -fopenmp`) into `~/.cache/tokenmill/kernels/` the
first time it is needed (a few seconds), then loaded with ctypes.
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
# the translation units (csrc/<unit>.c) linked into each library; a library not listed is its own one unit
_QLINEAR = ("qlinear", "qlinear_k", "qlinear_i8", "qlinear_amx", "qlinear_bf16", "qlinear_i8gemm")
LIBRARIES = {
    "attention": ("attention", "attention_prefill", "attention_prefill_bf16"),
    "qlinear": _QLINEAR,
    "layer": ("layer", "rmsnorm", *_QLINEAR, "attention", "lora"),
    "moe": ("moe", *_QLINEAR, "qlinear_amx_i8"),
    "moe_layer": ("moe_layer", "moe", "rmsnorm", *_QLINEAR, "qlinear_amx_i8", "attention"),
}


def library_units(name: str) -> tuple[str, ...]:
    return LIBRARIES.get(name, (name,))


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


def _compile(cc: str, flags: list[str], srcs: list[Path], out: Path) -> str:
    """Compile each unit to an object (in parallel), link them into `out`; '' or why it failed."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
        objs = [os.path.join(tmpdir, f"{src.stem}.o") for src in srcs]
        procs = [subprocess.Popen([cc, *flags, "-c", str(src), "-o", obj], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(srcs, objs)]
        failed = ""
        for src, proc in zip(srcs, procs):
            try:
                _, err = proc.communicate(timeout=300)
                why = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                why = "timed out"
            if proc.returncode != 0 and not failed:
                failed = f"compiling {src.name} failed: {why}"
        if failed:
            return failed
        tmp = os.path.join(tmpdir, out.name)
        res = subprocess.run([cc, *LINK_FLAGS, *objs, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            return f"linking {out.name} failed: {(res.stderr.strip().splitlines() or [res.returncode])[-1]}"
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
    return ""


@functools.lru_cache(maxsize=None)
def _build(name: str) -> tuple[Optional[ctypes.CDLL], str]:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None, f"C kernels are built for Linux x86_64/aarch64 only (this is {platform.system()} {platform.machine()})"
    srcs = [CSRC / f"{unit}.c" for unit in library_units(name)]
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
    parts = [src.name + "\0" + _source_text(src) for src in srcs]
    key = hashlib.sha256("\0".join([*parts, " ".join(flags + LINK_FLAGS), version, _cpu_signature()]).encode())
    out = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            err = _compile(cc, flags, srcs, out)
        except (OSError, subprocess.SubprocessError) as e:
            err = f"building {out.name} failed: {e}"
        if err:
            return None, err
    try:
        import torch  # noqa: F401  (load torch's libgomp first, so the kernels share its OpenMP runtime)
        return ctypes.CDLL(str(out)), ""
    except OSError as e:
        return None, f"loading {out.name} failed: {e}"


def load_library(name: str) -> Optional[ctypes.CDLL]:
    """The compiled library `name` (linked from `library_units(name)`), or None (with a one-time warning) when
    it cannot be built."""
    lib, err = _build(name)
    if lib is None:
        log.warning("CPU kernels %r unavailable (%s); using the PyTorch reference", name, err)
    return lib


def build_error(name: str) -> str:
    """Why `load_library(name)` returned None ('' when it loaded)."""
    return _build(name)[1]
