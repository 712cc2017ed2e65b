"""The C-kernel builder: loading a kernel library must not change the process's float behaviour."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def test_loading_kernels_keeps_denormals():
    # gcc links crtfastmath.o (flush-to-zero + denormals-are-zero for the whole process) into a shared
    # object linked with -ffast-math; torch's float results would then change after the first kernel load
    code = (
        "import torch\n"
        "from tokenmill.ops.cpu.build import load_library\n"
        "lib = load_library('attention')\n"
        "assert lib is not None\n"
        "x = torch.tensor([1e-40], dtype=torch.float32)\n"
        "print(float(x * 1.0), float(torch.tensor(1e-39) / 10))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    a, b = map(float, out.stdout.split())
    assert a > 0 and b > 0, out.stdout


def _fresh_build(monkeypatch, tmp_path, csrc):
    """Point the builder at a copy of csrc/ and an empty cache; the lru cache is emptied before and after."""
    from tokenmill.ops.cpu import build

    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    build._build.cache_clear()  # emptied again after the test (csrc_copy)
    return build


@pytest.fixture
def csrc_copy(tmp_path):
    from tokenmill.ops.cpu import build

    dst = tmp_path / "csrc"
    shutil.copytree(build.CSRC, dst)
    yield dst
    build._build.cache_clear()


def test_library_links_its_units_and_keys_on_their_headers(monkeypatch, tmp_path, csrc_copy):
    build = _fresh_build(monkeypatch, tmp_path, csrc_copy)
    if build.build_error("layer"):
        pytest.skip(build.build_error("layer"))
    layer = build.load_library("layer")
    for sym in ("tm_llama_layer", "add_rmsnorm_f32", "qlinear_f32", "tm_amx_init", "tm_paged_attention"):
        assert hasattr(layer, sym), sym  # layer.c's own entry points and those of the units it links
    first = sorted(p.name for p in build.cache_dir().iterdir())
    assert len(first) == 1 and first[0].startswith("layer-")
    build._build.cache_clear()
    build.load_library("layer")
    assert sorted(p.name for p in build.cache_dir().iterdir()) == first  # cached: not built again
    (csrc_copy / "kernels.h").write_text((csrc_copy / "kernels.h").read_text() + "\n// changed\n")
    build._build.cache_clear()
    assert build.load_library("rmsnorm") is not None and build.load_library("layer") is not None
    names = sorted(p.name for p in build.cache_dir().iterdir())
    assert len([n for n in names if n.startswith("layer-")]) == 2  # a header change rebuilds what includes it


def test_build_failures_fall_back_with_a_reason(monkeypatch, tmp_path, csrc_copy):
    build = _fresh_build(monkeypatch, tmp_path, csrc_copy)
    if build.build_error("rmsnorm"):
        pytest.skip(build.build_error("rmsnorm"))
    before = sorted(build.cache_dir().iterdir())
    (csrc_copy / "rmsnorm.c").write_text("this is not C\n")
    build._build.cache_clear()
    assert build.load_library("rmsnorm") is None
    assert "compiling rmsnorm.c failed" in build.build_error("rmsnorm")
    assert sorted(build.cache_dir().iterdir()) == before  # nothing half-built left in the cache
    build._build.cache_clear()
    monkeypatch.setattr(build, "_compiler", lambda: None)
    assert build.load_library("qlinear") is None and "no C compiler" in build.build_error("qlinear")
