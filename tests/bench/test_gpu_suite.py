"""bench/gpu_suite.sh: the dry run end to end (tiny shapes on the CPU), and on the CPU what the device run will
use: its engine arguments, sizes, rooflines, time limits, the greedy comparison and the report."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_suite import __main__ as suite_main
from bench.gpu_suite.common import NOMINAL_BANDWIDTH, NOMINAL_MATMUL, SKIPPED_NO_CUDA, load_config, shape_of
from bench.gpu_suite.report import write_report
from bench.gpu_suite.sizes import DRY, FULL
from bench.gpu_suite.steps_engine import fp8_args, kv_gib_for, llama8b_args, long_args, long_config, prefix_args
from bench.gpu_suite.steps_hf import compare_greedy
from tokenmill.config import EngineConfig
from tokenmill.core.outputs import Logprob

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_suite.sh"


def _script_steps() -> dict[str, int]:
    text = SCRIPT.read_text()
    out = {}
    for var in ("STEPS", "OPTIONAL"):
        m = re.search(rf'^{var}="([^"]*)"', text, re.M)
        out.update({s.split(":")[0]: int(s.split(":")[1]) for s in m.group(1).split()})
    return out


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--python", sys.executable],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    assert res["dry_run"] is True
    names = [s["name"] for s in res["steps"]]
    assert names == list(suite_main.STEPS)
    for s in res["steps"]:
        want = SKIPPED_NO_CUDA if s["name"] in suite_main.CUDA_ONLY else "ok"
        assert s["status"] == want, (s["name"], s["status"], s.get("errors"))
        if s["status"] == "ok":
            assert s["rows"] and all(r["value"] is not None for r in s["rows"]), s
    # the table comes last, and is also written beside the JSON
    tail = p.stdout.strip().splitlines()
    assert tail[-1].startswith(f"{len(names)}/{len(names)} steps ok or skipped")
    assert "| step | metric | value |" in p.stdout
    assert (out / "gpu_suite.md").read_text().strip() == p.stdout[p.stdout.index("# tokenmill GPU suite"):].strip()
    log = (out / "gpu_suite.log").read_text()
    assert all(f"===== {n} " in log for n in names)
    assert not list(tmp.iterdir()), "the suite left temporary folders behind"


def test_full_run_engine_args_are_valid():
    """Every engine of the device run is built from arguments the config accepts (no GPU needed to catch a typo)."""
    folder = "unused"
    kv_gib = kv_gib_for(load_config("8b", False), FULL, 2)
    for args in (llama8b_args(FULL), long_args(FULL), fp8_args(FULL, "auto", kv_gib), fp8_args(FULL, "fp8", kv_gib),
                 prefix_args(FULL, True), prefix_args(FULL, False)):
        cfg = EngineConfig.from_kwargs(model=folder, load_format="dummy", dtype="bfloat16", device="cuda",
                                       skip_tokenizer_init=True, **args)
        assert cfg.model.max_model_len == args["max_model_len"]


def test_full_sizes_fit_the_h100_and_the_issue():
    cfg = load_config("8b", False)
    shape = shape_of(cfg)
    assert FULL.offline_requests == 512 and (FULL.offline_prompt, FULL.offline_new) == (512, 256)
    assert (FULL.batch1_prompt, FULL.batch1_new) == (128, 256) and FULL.long_context == 32768
    assert FULL.offline_max_model_len >= 768 and FULL.offline_max_seqs == FULL.offline_requests
    # all 512 offline requests resident: weights + KV inside 0.9 of an 80 GB card, with room for activations
    kv = FULL.offline_requests * (FULL.offline_prompt + FULL.offline_new) * shape.kv_bytes_per_token(2)
    assert shape.weight_bytes(2) + kv < 0.9 * 80e9 - 4e9
    # the 32k run: the config's positions are raised to the run's length
    lc = long_config(cfg, FULL)
    assert cfg["max_position_embeddings"] == 8192 and lc["max_position_embeddings"] >= FULL.long_max_model_len
    assert FULL.long_max_model_len >= FULL.long_context + FULL.long_new
    # FP8 KV: both get the memory of 32k bf16 tokens = 4 GiB on the 8B shape; the workload cannot fit in bf16
    assert kv_gib_for(cfg, FULL, 2) == pytest.approx(4.0)
    need = FULL.fp8_requests * (FULL.fp8_prompt + FULL.fp8_new)
    assert need > 2 * FULL.fp8_kv_tokens  # memory-bound even for fp8; max_num_seqs does not cap the batch first
    assert fp8_args(FULL, "fp8", 4.0)["max_num_seqs"] * FULL.fp8_max_model_len > 2 * FULL.fp8_kv_tokens
    assert FULL.prefix_max_model_len >= FULL.prefix_len + FULL.question_len + FULL.prefix_new
    assert max(FULL.eq_prompt_lens) + FULL.eq_new + 16 <= load_config("1b", False)["max_position_embeddings"]
    assert FULL.eq_new > FULL.eq_min_match == 32 and FULL.eq_tie_tol == 1e-2
    # the dry run's tiny shapes exercise the same paths: the 32k step raises max_position_embeddings there too
    assert long_config(load_config("8b", True), DRY)["max_position_embeddings"] > load_config("8b", True)[
        "max_position_embeddings"]


def test_full_rooflines_match_the_issue():
    from bench.gpu_roofline import batch1_decode_roofline, long_context_roofline, offline_roofline

    shape = shape_of(load_config("8b", False))
    b1 = batch1_decode_roofline(shape, NOMINAL_BANDWIDTH, context=FULL.batch1_prompt + FULL.batch1_new // 2)
    assert 185 < b1.tokens_per_s < 188  # "about 187 tok/s on an H100 at 3.0 TB/s"
    off = offline_roofline(shape, NOMINAL_BANDWIDTH, NOMINAL_MATMUL, FULL.offline_requests, FULL.offline_prompt,
                           FULL.offline_new)
    assert 12_000 < off.tokens_per_s < 14_000  # ANCHORS: about 12.9k tok/s
    long = long_context_roofline(shape, NOMINAL_BANDWIDTH, context=FULL.long_context + FULL.long_new // 2)
    assert 140 < long.tokens_per_s < 150  # (16.06 GB + 4.3 GB of KV) / 3.0 TB/s


def test_time_limits_fit_nine_minutes():
    steps = _script_steps()
    assert list(steps) == list(suite_main.STEPS)
    optional = re.search(r'^OPTIONAL="([^"]*)"', SCRIPT.read_text(), re.M).group(1).split()
    required = sum(v for k, v in steps.items() if k not in {s.split(":")[0] for s in optional})
    budget = int(re.search(r"^BUDGET=(\d+)", SCRIPT.read_text(), re.M).group(1))
    assert required <= budget <= 540 and all(30 <= v <= 120 or k == "device" for k, v in steps.items())


def _lp(tok: int, lp: float, top: list[tuple[int, float]]) -> Logprob:
    return Logprob(token_id=tok, logprob=lp, rank=1, top=top)


def _hf(tokens: list[int], gaps: dict[int, tuple[int, float]]) -> dict:
    top2 = [([t, 999], [5.0, 4.0]) for t in tokens]
    for i, (other, gap) in gaps.items():
        top2[i] = ([tokens[i], other], [5.0, 5.0 - gap])
    return {"tokens": tokens, "top2": top2, "logprobs": [-1.0] * len(tokens)}


def test_compare_greedy_rules():
    toks = list(range(10, 50))
    lps = [_lp(t, -1.0, [(t, -1.0), (999, -2.0)]) for t in toks]
    assert compare_greedy(toks, lps, _hf(toks, {}), 32, 1e-2) == {
        "compared": 40, "first_divergence": None, "max_logprob_diff": 0.0, "ok": True}
    late = toks[:35] + [77] + toks[36:]
    r = compare_greedy(late, lps, _hf(toks, {35: (77, 0.005)}), 32, 1e-2)
    assert r["ok"] and r["first_divergence"] == 35 and r["hf_top2_gap"] == pytest.approx(0.005)
    assert not compare_greedy(late, lps, _hf(toks, {35: (77, 0.05)}), 32, 1e-2)["ok"]  # gap too large
    assert not compare_greedy(late, lps, _hf(toks, {35: (78, 0.005)}), 32, 1e-2)["ok"]  # not HF's runner-up
    early = toks[:10] + [77] + toks[11:]
    assert not compare_greedy(early, lps, _hf(toks, {10: (77, 0.001)}), 32, 1e-2)["ok"]  # before 32 tokens
    assert not compare_greedy(toks[:20], lps, _hf(toks, {}), 32, 1e-2)["ok"]  # tokenmill stopped early


def test_report_marks_missing_timeout_and_failed_steps(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    ok = {"name": "device", "status": "ok", "rows": [{"metric": "m", "value": 2.0, "unit": "x", "ref": 4.0,
                                                        "ref_label": "r", "ratio": 0.5, "target": 0.9, "met": False,
                                                        "higher_is_better": True, "note": ""}], "details": {}}
    (work / "device.json").write_text(json.dumps(ok))
    (work / "llama8b.json").write_text(json.dumps({**ok, "name": "llama8b"}))
    (work / "llama8b.status").write_text("timeout after 120 s\n")  # stopped after saving partial rows
    (work / "long32k.status").write_text("failed: exit 1\n")
    (work / "long32k.log").write_text("Traceback ...\nRuntimeError: boom\n")
    (work / "hf_8b.status").write_text("skipped: not enough time left (optional)\n")
    rc = write_report(str(work), str(out), ["device", "llama8b", "long32k", "prefix", "hf_8b"], dry=False)
    assert rc == 1
    res = json.loads((out / "gpu_suite.json").read_text())
    st = {s["name"]: s["status"] for s in res["steps"]}
    assert st == {"device": "ok", "llama8b": "timeout after 120 s (after: ok)", "long32k": "failed: exit 1",
                  "prefix": "failed: wrote no result", "hf_8b": "skipped: not enough time left (optional)"}
    assert "RuntimeError: boom" in res["steps"][2]["log_tail"]
    table = capsys.readouterr().out
    assert "| device | m | 2.00 x | 4.00 (r) | 0.50x | ratio >= 0.9 | NO |" in table
    assert table.strip().splitlines()[-1].startswith("2/5 steps ok or skipped")


def test_full_steps_skip_without_cuda(tmp_path):
    """The device run's steps on a machine without CUDA: recorded as skipped, nothing heavy is loaded."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the step would run for real")
    assert suite_main.main(["llama8b", "--work", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "llama8b.json").read_text())
    assert res["status"] == SKIPPED_NO_CUDA and res["rows"] == []


def test_script_rejects_bad_arguments(tmp_path):
    for args, msg in ((["--frobnicate"], "unknown argument: --frobnicate"), (["--budget", "9m"], "--budget must be"),
                      (["--steps", "llama8b,nope"], "unknown step 'nope'")):
        p = subprocess.run(["bash", str(SCRIPT), *args, "--out", str(tmp_path), "--python", sys.executable],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not os.listdir(tmp_path) or "gpu_suite.json" not in os.listdir(tmp_path)


def test_guard_keeps_rows_of_a_step_stopped_at_its_limit(tmp_path):
    from bench.gpu_suite.common import Ctx, Step, StepTimeout, row

    step = Step("llama8b", Ctx(dry=False, cuda=False, work=str(tmp_path), t0=0.0))
    with step.guard("batch-1 decode"):
        step.add(row("batch-1 decode", 150.0, "tok/s", ref=187.0, target=0.9))
    with step.guard("broken"):
        raise RuntimeError("CUDA error: an illegal memory access\nmore")
    with pytest.raises(StepTimeout):
        with step.guard("offline"):
            raise StepTimeout()
    saved = json.loads((tmp_path / "llama8b.json").read_text())  # written after every measurement
    assert [r["metric"] for r in saved["rows"]] == ["batch-1 decode", "broken", "offline"]
    assert saved["rows"][0]["met"] is False and saved["rows"][0]["ratio"] == pytest.approx(150 / 187)
    assert saved["rows"][1]["note"] == "error: RuntimeError: CUDA error: an illegal memory access"
    assert saved["rows"][2]["note"] == "stopped at the step's time limit"
    assert saved["status"].startswith("error: 1 failed (broken: RuntimeError")


def test_bf16_ulp():
    from bench.gpu_suite.steps_hf import bf16_ulp

    assert bf16_ulp(3.9) == 2 ** -6 and bf16_ulp(-1.0) == 2 ** -7 and bf16_ulp(300.0) == 2.0


def test_gpu_tests_step_parses_a_real_pytest_run(tmp_path, monkeypatch):
    """The device branch of the gpu_tests step (pytest -v, parse, rows) on a CPU-only test file."""
    from bench.gpu_suite import steps_basic
    from bench.gpu_suite.common import Ctx, Step

    monkeypatch.setattr(steps_basic, "GPU_TEST_PATHS", ("tests/gpu/test_memory_planner.py",))
    step = Step("gpu_tests", Ctx(dry=False, cuda=True, work=str(tmp_path), t0=0.0))
    steps_basic.run_gpu_tests(step.ctx, step, limit_s=120)
    (r,) = step.rows
    assert r["metric"] == "GPU + kernel tests passed" and r["value"] >= 7 and r["ratio"] == 1.0 and r["met"] is True
    assert step.status == "ok" and len(step.details["tests"]["PASSED"]) == r["value"]
    import torch

    assert r["note"] == ("0 skipped" if torch.cuda.is_available() else "1 skipped")  # its CUDA-only test


def test_parse_pytest_outcomes():
    from bench.gpu_suite.steps_basic import parse_pytest

    text = ("tests/gpu/a.py::test_x PASSED                 [ 10%]\n"
            "tests/ops/b.py::test_y[bf16-1] FAILED         [ 20%]\n"
            "tests/gpu/c.py::test_z SKIPPED (needs CUDA)   [ 30%]\n"
            "FAILED tests/ops/b.py::test_y[bf16-1] - AssertionError\n")
    assert parse_pytest(text) == {"PASSED": ["tests/gpu/a.py::test_x"], "FAILED": ["tests/ops/b.py::test_y[bf16-1]"],
                                  "SKIPPED": ["tests/gpu/c.py::test_z"]}


def test_plan_capacity_from_a_measured_plan():
    """The CUDA branch: the engine's plan (here from the planner test's simulated H100) re-planned for fp8."""
    import torch

    from bench.gpu_suite.steps_engine import plan_capacity
    from tokenmill.worker.memory_planner import DeviceMemory, plan_kv_cache

    dev = DeviceMemory(total_bytes=80 * 10**9, weights_bytes=16_060_000_000, peak_activation_bytes=2 * 10**9,
                       other_bytes=500_000_000, name="simulated H100")
    plan = plan_kv_cache(dev, 0.9, 131072, block_size=16, max_model_len=8192, cuda_graph_bytes=300_000_000)
    shape = shape_of(load_config("8b", False))
    cap = plan_capacity(plan, shape, torch.bfloat16, 16, 1024)
    room = 72 * 10**9 - 16_060_000_000 - 2 * 10**9 - 500_000_000 - 300_000_000
    assert cap["auto"] == plan.max_concurrent_tokens == 405_424
    assert cap["fp8"] == room // (16 * 65536) * 16 and cap["fp8"] / cap["auto"] > 1.99
    sim = plan_capacity(None, shape, torch.bfloat16, 16, 1024)  # no CUDA: a simulated H100
    assert sim["device"] == "simulated H100 (no CUDA)" and sim["fp8"] > 1.99 * sim["auto"]
