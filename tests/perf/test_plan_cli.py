"""`tokenmill plan` end to end with a saved calibration (no weights loaded), and its user errors."""
from __future__ import annotations

import argparse
import json

import pytest

from tokenmill.perf.cli import add_plan_args
from tokenmill.perf.cost_model import CostModel, ModelSpec

SPEC = ModelSpec(30, 576, 9, 3, 64, 1536, 49152)


def parse(argv):
    parser = argparse.ArgumentParser(prog="tokenmill")
    sub = parser.add_subparsers(dest="command")
    add_plan_args(sub)
    return parser.parse_args(["plan", *argv])


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cpu.json"
    CostModel(SPEC, bandwidth=20e9, matmul_rate=1.3e12, o_step=0.004, o_req=3e-4, o_tok=1e-4,
              info={"calibrated": True, "model": None, "weights_total_bytes": 538057728,
                    "max_model_len": 8192}).save(str(path))
    return str(path)


def test_plan_prints_memory_goodput_and_best_settings(calibration, tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = parse(["--calibration", calibration, "--workload", "long-prefill", "--slo-ttft", "1000",
                  "--slo-tpot", "60", "--rate", "3", "--num-requests", "25", "--out", str(out),
                  "--kv-cache-dtype", "float32"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "KV per token" in text and "45.0 KiB (float32)" in text  # 30 layers x 2 x 3 heads x 64 x 4 bytes
    assert "best: --max-num-batched-tokens" in text and "(current)" in text
    plan = json.loads(out.read_text())
    m = plan["memory"]
    assert m["kv_bytes_per_token"] == 46080 and m["kv_tokens"] == (1 << 30) // 46080 // 16 * 16
    assert m["weights_bytes"] == 538057728  # 134.5M parameters in float32
    assert len(plan["grid"]) == 15
    best = max(g["goodput"] for g in plan["grid"])
    chosen = [g for g in plan["grid"] if g["max_num_batched_tokens"] == plan["best"]["max_num_batched_tokens"]
              and g["max_num_seqs"] == plan["best"]["max_num_seqs"]]
    assert chosen[0]["goodput"] == pytest.approx(best, abs=1e-6)


def test_plan_sizes_the_kv_cache_in_the_resolved_kv_dtype(calibration, tmp_path, capsys):
    from tokenmill.perf.cli import kv_cache_dtype_for

    auto = kv_cache_dtype_for("auto", "auto", "cpu", SPEC.head_dim)  # bfloat16 on an AVX-512 CPU, else float32
    assert auto in ("float32", "bfloat16")
    for kind, resolved in (("auto", auto), ("bfloat16", "bfloat16"), ("int8", "int8")):
        out = tmp_path / f"{kind}.json"
        args = parse(["--calibration", calibration, "--workload", "fixed:64:16", "--rate", "1", "--num-requests",
                      "10", "--kv-cache-dtype", kind, "--out", str(out)])
        assert args.func(args) == 0
        assert f"({resolved})" in capsys.readouterr().out
        m = json.loads(out.read_text())["memory"]
        per_token = 30 * 2 * 3 * 64 * {"float32": 4, "bfloat16": 2, "int8": 1}[resolved]
        assert m["kv_cache_dtype"] == resolved and m["kv_bytes_per_token"] == per_token
        assert m["kv_tokens"] == (1 << 30) // per_token // 16 * 16


def test_plan_user_errors_exit_2(calibration, tmp_path, capsys):
    args = parse(["--calibration", str(tmp_path / "nope.json"), "--rate", "1"])
    assert args.func(args) == 2
    assert "calibration file not found" in capsys.readouterr().err
    args = parse(["--calibration", calibration, "--rate", "-1"])
    assert args.func(args) == 2
    args = parse(["--calibration", calibration, "--workload", "nonsense", "--rate", "1"])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("tokenmill plan: error:") for e in err)


def test_plan_finds_max_rate_without_rate(calibration, capsys):
    args = parse(["--calibration", calibration, "--workload", "fixed:64:16", "--slo-ttft", "500",
                  "--slo-tpot", "80", "--num-requests", "30"])
    assert args.func(args) == 0
    assert "highest rate meeting the SLOs" in capsys.readouterr().out


def test_plan_without_slo_or_rate_predicts_near_capacity(calibration, capsys):
    # no SLO: every rate "meets" it, so the rate search would run away; plan at 80% of the simulated capacity
    args = parse(["--calibration", calibration, "--workload", "fixed:64:16", "--num-requests", "30"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "highest rate meeting the SLOs" not in text
    m = __import__("re").search(r"capacity ([0-9.e+]+) req/s", text)
    assert m, text
    cap = float(m.group(1))
    assert 0 < cap < 1000
    assert f"predicted at {0.8 * cap:.3g} req/s" in text


def test_plan_fits_the_cost_model_to_a_served_step_trace(calibration, tmp_path, capsys):
    trace = tmp_path / "steps.jsonl"
    truth = CostModel(SPEC, bandwidth=0.0, matmul_rate=0.0, o_step=0.03, o_tok=5e-4)
    lines = []
    for i, n in enumerate(range(40, 1300, 60)):
        s = truth.predict(n, 1, n, n * (n + 1) // 2)
        lines.append(json.dumps({"t": 100.0 + i, "s": s, "tokens": n, "reqs": 1, "kv": n, "pairs": n * (n + 1) // 2}))
    trace.write_text("\n".join(lines) + "\n")
    out = tmp_path / "plan.json"
    args = parse(["--calibration", calibration, "--calibration-trace", str(trace), "--workload", "fixed:512:1",
                  "--rate", "0.5", "--num-requests", "10", "--out", str(out)])
    assert args.func(args) == 0
    assert "cost model fitted to 21 served steps" in capsys.readouterr().out
    cm = json.loads(out.read_text())["cost_model"]
    fitted = CostModel.from_dict({**cm, "format": "tokenmill-cost-model-1", "info": {}})
    assert fitted.predict(512, 1, 512, 512 * 513 // 2) == pytest.approx(0.03 + 512 * 5e-4, rel=0.02)
    args = parse(["--calibration", calibration, "--calibration-trace", str(tmp_path / "none.jsonl"), "--rate", "1"])
    assert args.func(args) == 2
    assert "step trace not found" in capsys.readouterr().err


def test_plan_pools_calibration_traces_and_reports_their_drift(calibration, tmp_path, capsys):
    """--calibration-trace repeated: passes taken at different times (before and after a run) are fitted together,
    and each pass's speed against that fit (the machine's drift between them) is printed and saved."""
    truth = CostModel(SPEC, bandwidth=0.0, matmul_rate=0.0, o_step=0.03, o_tok=5e-4)
    paths = []
    for k, scale in enumerate((1.0, 1.2)):
        lines = []
        for i, n in enumerate(range(40, 1300, 60)):
            s = truth.predict(n, 1, n, n * (n + 1) // 2) * scale
            lines.append(json.dumps({"t": 100.0 + 50 * k + i, "s": s, "tokens": n, "reqs": 1, "kv": n,
                                     "pairs": n * (n + 1) // 2}))
        paths.append(tmp_path / f"pass{k}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")
    out = tmp_path / "plan.json"
    args = parse(["--calibration", calibration, "--calibration-trace", str(paths[0]), "--calibration-trace",
                  str(paths[1]), "--workload", "fixed:512:1", "--rate", "0.5", "--num-requests", "10",
                  "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "cost model fitted to 42 served steps" in text and "drift between them 20.0%" in text
    plan = json.loads(out.read_text())
    assert plan["calibration_traces"]["drift"] == pytest.approx(0.2, rel=0.01)
    assert plan["calibration_traces"]["files"] == [str(p) for p in paths]
    fitted = CostModel.from_dict({**plan["cost_model"], "format": "tokenmill-cost-model-1", "info": {}})
    assert fitted.predict(512, 1, 512, 512 * 513 // 2) == pytest.approx(1.1 * (0.03 + 512 * 5e-4), rel=0.03)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = parse(["--calibration", calibration, "--calibration-trace", str(paths[0]), "--calibration-trace",
                  str(empty), "--rate", "1"])
    assert args.func(args) == 2
    assert "empty.jsonl holds no steps" in capsys.readouterr().err


def test_amx_tiles_are_counted_for_a_small_quantized_gguf_on_an_amx_cpu(tmp_path):
    """gemm auto keeps a small packed model's linears as bf16 tiles too (QuantizedLinear.pack_amx): plan counts
    them where the engine makes them (a GGUF on a CPU with AMX or AVX512-BF16), and nowhere else."""
    from tokenmill.engine.llm import LLM
    from tokenmill.model.layers.quantized import DENSE_COPY_MAX_BYTES, gemm_int8
    from tokenmill.ops.cpu.qlinear import amx_available, bf16_dot_available
    from tokenmill.perf.cli import amx_tiles_bytes

    want = 2 * (SPEC.layer_params + SPEC.lm_head_params) if amx_available() or bf16_dot_available() else 0
    if want and gemm_int8("auto"):  # int8 panels: 1 byte a weight + 8 bytes per output and 64 k's (SmolLM2)
        want = int(1.125 * (SPEC.layer_params + SPEC.lm_head_params))
    model = LLM(num_threads=1).engine.core.runner.model
    made = sum(m.panels.numel() * m.panels.element_size() for m in model.modules() if getattr(m, "panels", None)
               is not None)
    assert abs(made - want) <= 0.01 * want  # what the engine made (panels round outputs up to 32)
    assert 0 < 2 * (SPEC.layer_params + SPEC.lm_head_params) <= DENSE_COPY_MAX_BYTES
    assert abs(amx_tiles_bytes(SPEC, None, "cpu") - want) <= 0.01 * want  # None: the bundled SmolLM2 GGUF
    assert amx_tiles_bytes(SPEC, None, "cuda") == 0
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert amx_tiles_bytes(SPEC, str(hf), "cpu") == 0  # a Hugging Face folder: no packed linears
    big = ModelSpec(80, 8192, 64, 8, 128, 28672, 128256)
    assert amx_tiles_bytes(big, None, "cpu") == 0  # over the cap: no tiles


def test_plan_weights_of_a_packed_gguf_are_the_file():
    """quantization auto keeps a GGUF's blocks packed on the CPU: plan counts the file's bytes, not float32
    parameters (SmolLM2's Q4_1 file is ~0.1 GB against ~0.5 GB of float32)."""
    import os

    from tokenmill.model.loader import resolve_model_source
    from tokenmill.ops.cpu.qlinear import available
    from tokenmill.perf.cli import model_spec_for

    path = resolve_model_source(None).gguf_path
    _, weights, _ = model_spec_for(None, "auto", "cpu")
    assert weights == (os.path.getsize(path) if available() else 538057728)
    assert model_spec_for(None, "bfloat16", "cpu")[1] == 538057728 // 2  # no packing for a bfloat16 model


def test_calibration_records_resident_weight_bytes():
    import torch

    from tokenmill.perf.cost_model import _resident_weight_bytes

    m = torch.nn.Linear(4, 3)
    m.register_buffer("packed", torch.zeros(10, dtype=torch.uint8))
    assert _resident_weight_bytes(m, 999) == (12 + 3) * 4 + 10  # parameters and buffers at their own size
    assert _resident_weight_bytes(None, 999) == 999
