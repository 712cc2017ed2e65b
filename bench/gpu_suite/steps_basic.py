"""Steps `device` (versions, copy bandwidth, bf16 matmul rate) and `gpu_tests` (tests/gpu and the Triton kernel
tests, compiled on the GPU). Both need CUDA; without it they record what they can and report skipped."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys

from bench.gpu_suite.common import NOMINAL_BANDWIDTH, NOMINAL_MATMUL, ROOT, SKIPPED_NO_CUDA, Ctx, Step, row

# tests/gpu plus the kernel tests, which run compiled on a CUDA machine (interpreted elsewhere)
GPU_TEST_PATHS = ("tests/gpu", "tests/ops/test_triton_attention.py", "tests/ops/test_kv_quant.py")
_RESULT = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_COLLECTED = re.compile(r"(\d+) tests? collected")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def run_device(ctx: Ctx, step: Step) -> None:
    step.details["versions"] = versions()
    if not ctx.cuda:
        step.details.update(bandwidth=None, matmul_flops=None)
        step.skip(SKIPPED_NO_CUDA)
        return
    import torch

    from bench.gpu_roofline import measure_copy_bandwidth, measure_matmul_flops

    props = torch.cuda.get_device_properties(0)
    step.details.update(device=torch.cuda.get_device_name(0), multiprocessors=props.multi_processor_count,
                        memory_gib=props.total_memory / (1 << 30), capability=f"{props.major}.{props.minor}")
    with step.guard("copy bandwidth"):
        bw = measure_copy_bandwidth()
        step.details["bandwidth"] = bw
        step.add(row("device-to-device copy (read + write)", bw / 1e12, "TB/s", ref=NOMINAL_BANDWIDTH / 1e12,
                     ref_label="H100 seen earlier (ANCHORS)"))
    with step.guard("bf16 matmul"):
        mm = measure_matmul_flops()
        step.details["matmul_flops"] = mm
        step.add(row("bf16 matmul 8192^3", mm / 1e12, "TFLOP/s", ref=NOMINAL_MATMUL / 1e12,
                     ref_label="H100 seen earlier (ANCHORS)"))


def parse_pytest(text: str) -> dict[str, list[str]]:
    """Test ids by outcome from `pytest -v` lines (also works on the output of a run cut off by a timeout)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _RESULT.match(line.strip())
        if m:
            out.setdefault(m.group(2), []).append(m.group(1))
    return out


def run_gpu_tests(ctx: Ctx, step: Step, limit_s: float) -> None:
    cmd = [sys.executable, "-m", "pytest", *GPU_TEST_PATHS, "-p", "no:cacheprovider"]
    env = dict(os.environ)
    if not ctx.cuda:  # check that the tests collect; they run only on a CUDA machine
        with step.guard("collect tests"):
            p = subprocess.run(cmd + ["--collect-only", "-q"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=max(10.0, limit_s - 5))
            sys.stdout.write(p.stdout[-4000:] + p.stderr[-2000:])
            m = _COLLECTED.search(p.stdout)
            if p.returncode != 0 or not m:
                raise RuntimeError(f"pytest --collect-only exited {p.returncode}")
            step.add(row("GPU tests collected (not run without CUDA)", int(m.group(1)), "tests"))
        if not step.errors:
            step.skip(SKIPPED_NO_CUDA)
        return
    with step.guard("GPU tests"):
        try:
            p = subprocess.run(cmd + ["-v", "-rfEs"], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=max(10.0, limit_s - 8))
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            text, rc = out + "\n[gpu_suite] pytest stopped at its time limit\n", None
        sys.stdout.write(text[-20000:])
        res = parse_pytest(text)
        passed, failed = len(res.get("PASSED", [])), len(res.get("FAILED", [])) + len(res.get("ERROR", []))
        skipped = len(res.get("SKIPPED", []))
        ran = passed + failed  # skipped tests are counted in the note, not against the pass rate
        step.details["tests"] = res
        step.add(row("GPU + kernel tests passed", passed, "tests", ref=ran or None, ref_label="passed + failed",
                     target=1.0, note=f"{skipped} skipped" + ("; cut off by the time limit" if rc is None else "")))
        if failed:
            bad = res.get("FAILED", []) + res.get("ERROR", [])
            step.errors.append(f"{failed} tests failed: " + ", ".join(bad[:5]))
        elif rc not in (0,):
            step.errors.append(f"pytest exited {rc}")
