"""Calibration and the offline benchmarks on a tiny random-weight Llama (real engine, CPU)."""
from __future__ import annotations

import argparse
import json

import pytest

from tests.model.tiny_models import save_tiny_model
from tokenmill import SamplingParams
from tokenmill.engine.llm import LLM
from tokenmill.perf.cost_model import CostModel, calibrate
from tokenmill.perf.offline import add_offline_args, main_offline, run_latency, run_throughput


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, gguf_tokenizer_path):
    path = save_tiny_model("llama", str(tmp_path_factory.mktemp("tiny") / "llama"))
    return LLM(path, tokenizer=gguf_tokenizer_path, dtype="float32", num_kv_blocks=256, block_size=16), path


def test_calibrate_fits_real_steps(tiny_llm, tmp_path):
    llm, _ = tiny_llm
    plan = ((1, 16, 3), (1, 200, 2), (1, 400, 2), (4, 64, 6), (16, 16, 6), (2, 300, 2))
    model = calibrate(llm, plan=plan, max_steps_per_case=6)
    assert model.info["calibrated"] and model.info["num_steps"] >= 20
    assert model.spec.num_layers == 3 and model.spec.hidden_size == 64
    # monotone in work, positive, and predicts the timed steps within a loose factor (no timed asserts:
    # the comparison is between the fit and the samples it was fitted on)
    assert 0 < model.predict(1, 1, 16, 16) <= model.predict(400, 1, 400, 400 * 401 // 2)
    assert model.info["median_rel_error"] < 1.0
    model.save(str(tmp_path / "c.json"))
    assert CostModel.load(str(tmp_path / "c.json")).predict(64, 4, 300, 900) == model.predict(64, 4, 300, 900)
    # the server's --slo-calibration hands the fit to the slo policy
    _, path = tiny_llm
    slo_llm = LLM(path, skip_tokenizer_init=True, dtype="float32", num_kv_blocks=64, policy="slo",
                  slo_calibration=str(tmp_path / "c.json"))
    pol = slo_llm.engine.core.scheduler.policy
    assert pol.name == "slo" and pol.cost_model.predict(64, 4, 300, 900) == model.predict(64, 4, 300, 900)
    out = slo_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_offline_throughput_and_latency(tiny_llm):
    llm, _ = tiny_llm
    res = run_throughput({}, input_len=40, output_len=8, num_prompts=6, llm=llm)
    assert res["output_tokens"] == 48 and res["input_tokens"] == 240 and res["requests_per_s"] > 0
    lat = run_latency({}, input_len=32, output_len=5, batch_sizes=(1, 4), num_iters=2, num_warmup=1, llm=llm)
    by = {r["batch_size"]: r for r in lat["results"]}
    assert set(by) == {1, 4}
    for r in by.values():
        assert r["e2e_ms"]["n"] == 2 and r["decode_step_ms"]["n"] == 2 * 4  # 4 decode steps after the first token
        assert r["prefill_ms"]["p50"] <= r["e2e_ms"]["p50"]


def test_offline_cli(tiny_llm, gguf_tokenizer_path, tmp_path, capsys):
    _, path = tiny_llm
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="bench_command")
    add_offline_args(sub)
    out = tmp_path / "t.json"
    args = parser.parse_args(["throughput", "--model", path, "--tokenizer", gguf_tokenizer_path, "--input-len", "20",
                              "--output-len", "4", "--num-prompts", "3", "--num-kv-blocks", "64", "--out", str(out)])
    assert main_offline(args) == 0
    assert json.loads(out.read_text())["output_tokens"] == 12
    assert json.loads(capsys.readouterr().out)["benchmark"] == "throughput"
