"""The cost model fitted to a served step trace (perf/step_trace.py): traces written by a known model are fitted
back; window and malformed-line handling; the fitted model replaces a miscalibrated one in the fleet simulator."""
from __future__ import annotations

import gzip
import json

import pytest

from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import CostModel, ModelSpec, StepShape
from tokenmill.perf.fleet import FleetSpec, simulate_fleet
from tokenmill.perf.simulator import SimConfig, SimRequest
from tokenmill.perf.step_trace import fit_trace, fit_trace_like, read_step_trace, read_step_trace_timed

SPEC = ModelSpec(30, 576, 9, 3, 64, 1536, 49152, dtype_bytes=2, kv_dtype_bytes=2)
# what the served producer "really" costs: 30 ms a step + 0.5 ms a token + the attention pairs
TRUE = CostModel(SPEC, bandwidth=0.0, matmul_rate=0.0, o_step=0.030, o_tok=0.0005, o_pair=2e-8,
                 small_regimes=((64, 0.030, 0.0005, 0.0),))


def prefill(n: int) -> StepShape:
    return StepShape(n, 1, n, n * (n + 1) // 2)


def write_trace(path, shapes, model=TRUE, t_start=1000.0, scale=1.0):
    with open(path, "w") as f:
        for i, sh in enumerate(shapes):
            f.write(json.dumps({"t": t_start + i, "s": model.predict_shape(sh) * scale, "tokens": sh.num_tokens,
                                "reqs": sh.num_reqs, "kv": sh.kv_tokens_read, "pairs": sh.attn_pairs}) + "\n")


SIZES = [40, 68, 90, 120, 160, 200, 260, 300, 380, 450, 520, 640, 800, 1000, 1250]


def test_fit_recovers_the_steps_it_was_given(tmp_path):
    path = tmp_path / "steps.jsonl"
    write_trace(path, [prefill(n) for n in SIZES])
    samples = read_step_trace(path)
    assert len(samples) == len(SIZES)
    model = fit_trace(SPEC, samples, switch_tokens=(4, 64))
    for n in (50, 150, 700, 1100):  # between the traced sizes too
        assert model.predict_shape(prefill(n)) == pytest.approx(TRUE.predict_shape(prefill(n)), rel=0.03)
    assert model.info["source"] == "step trace" and model.info["trace_tokens_range"] == [40, 1250]
    assert model.info["median_rel_error"] < 0.01


def test_window_and_bad_lines(tmp_path):
    path = tmp_path / "steps.jsonl"
    write_trace(path, [prefill(n) for n in SIZES], t_start=100.0)
    assert len(read_step_trace(path, t0=103.0, t1=106.5)) == 4  # steps starting at 103, 104, 105, 106
    assert read_step_trace(path, t0=10_000.0) == []
    timed = read_step_trace_timed(path, t0=103.0, t1=106.5)
    assert [t for t, _, _ in timed] == [103.0, 104.0, 105.0, 106.0]
    assert [(sh, s) for _, sh, s in timed] == read_step_trace(path, t0=103.0, t1=106.5)
    gz = tmp_path / "steps.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_step_trace_timed(gz, t0=103.0, t1=106.5) == timed
    path.write_text(path.read_text() + "\n" + '{"t": 1, "s": 0.1}\n')
    with pytest.raises(ConfigError, match=r"steps.jsonl:\d+: not a step trace line"):
        read_step_trace(path)
    with pytest.raises(ConfigError, match="not found"):
        read_step_trace(tmp_path / "missing.jsonl")


def test_too_short_a_trace_is_refused(tmp_path):
    path = tmp_path / "steps.jsonl"
    write_trace(path, [prefill(n) for n in SIZES[:5]])
    with pytest.raises(ConfigError, match="too short"):
        fit_trace(SPEC, read_step_trace(path))


def test_fit_like_keeps_the_calibrations_regimes_and_facts(tmp_path):
    base = CostModel(SPEC, o_step=0.01, small_regimes=((4, 0.01, 0.0, 0.0), (64, 0.02, 0.0, 0.0)),
                     info={"model": "m", "num_threads": 1, "samples": [[1, 1, 1, 1, 0.1]]})
    path = tmp_path / "steps.jsonl"
    write_trace(path, [prefill(n) for n in SIZES])
    model = fit_trace_like(base, read_step_trace(path))
    assert model.info["model"] == "m" and model.info["num_threads"] == 1 and "samples" not in model.info
    assert set(model.switch_tokens) <= {4, 64, 256, 1024}


def test_size_regimes_follow_a_per_token_cost_that_grows_with_the_step(tmp_path):
    """Served steps whose cost per token rises with their size (cache spill) and barely with attention pairs: fitted
    with the size regimes, a step of several prompts is predicted like one prompt of the same tokens."""
    def cost(tokens, pairs):  # 0.37 ms a token up to 256, 0.5 up to 1024, 0.6 beyond; pairs nearly free
        per = 0.00037 if tokens < 256 else 0.0005 if tokens < 1024 else 0.0006
        return 0.03 + per * tokens + 1e-8 * pairs
    path = tmp_path / "steps.jsonl"
    with open(path, "w") as f:
        for i, n in enumerate([70, 90, 120, 150, 180, 210, 240, 270, 320, 400, 480, 560, 700, 850, 1000, 1100, 1250,
                               1500]):
            sh = prefill(n)
            f.write(json.dumps({"t": i, "s": cost(n, sh.attn_pairs), "tokens": n, "reqs": 1, "kv": n,
                                "pairs": sh.attn_pairs}) + "\n")
        for i, lens in enumerate([(150, 150), (100, 200, 100), (500, 400), (700, 600)]):  # a few batched prompts
            sh = StepShape.of([(0, n) for n in lens])  # (they tell a cost per step from one per request)
            f.write(json.dumps({"t": 100 + i, "s": cost(sh.num_tokens, sh.attn_pairs), "tokens": sh.num_tokens,
                                "reqs": sh.num_reqs, "kv": sh.kv_tokens_read, "pairs": sh.attn_pairs}) + "\n")
    base = CostModel(SPEC, small_regimes=((4, 0.0, 0.0, 0.0), (64, 0.0, 0.0, 0.0)))
    model = fit_trace_like(base, read_step_trace(path))
    for lens in ((300, 300), (200, 200, 200), (600, 500)):
        sh = StepShape.of([(0, n) for n in lens])
        assert model.predict_shape(sh) == pytest.approx(cost(sh.num_tokens, sh.attn_pairs), rel=0.05), lens


def test_served_calibration_fixes_the_disaggregated_prediction(tmp_path):
    """A producer whose served steps run 1.2x the in-process calibration: the model fitted to a served trace of other
    prompts predicts the prefill instance's TTFT; the in-process one is 1.2x short on every prefill."""
    calib = TRUE.scaled(1 / 1.2)
    path = tmp_path / "producer.jsonl"
    write_trace(path, [prefill(n) for n in SIZES], scale=1.0)  # the served steps: TRUE
    served = fit_trace_like(calib, read_step_trace(path))
    reqs = [SimRequest(p, 20, 2.0 * i) for i, p in enumerate((100, 330, 610, 900))]  # no queueing
    spec = FleetSpec(2, 1)
    truth = simulate_fleet(reqs, TRUE, SimConfig(), spec).ttft_s
    assert simulate_fleet(reqs, served, SimConfig(), spec, decode_cost=TRUE).ttft_s == pytest.approx(truth, rel=0.03)
    short = simulate_fleet(reqs, calib, SimConfig(), spec, decode_cost=TRUE).ttft_s
    assert all(s < 0.86 * t for s, t in zip(short, truth))


def test_passes_fitted_together_show_the_drift_between_them():
    from tokenmill.perf.step_trace import fit_passes_like, speed_drift, trace_speed

    base = fit_trace(SPEC, [(prefill(n), TRUE.predict_shape(prefill(n))) for n in SIZES], switch_tokens=(4, 64))
    before = [(prefill(n), TRUE.predict_shape(prefill(n))) for n in SIZES]
    after = [(prefill(n), TRUE.predict_shape(prefill(n)) * 1.1) for n in SIZES]  # the machine 10% slower
    assert trace_speed(TRUE, after) == pytest.approx(1.1)
    model, speeds = fit_passes_like(base, [before, after])
    assert speeds[1] / speeds[0] == pytest.approx(1.1, rel=0.01)
    assert speeds[0] == pytest.approx(1 / 1.05, rel=0.02) and speeds[1] == pytest.approx(1.1 / 1.05, rel=0.02)
    assert model.info["pass_speeds"] == speeds
    for n in (100, 700):  # the pooled fit sits at the passes' mean speed
        assert model.predict_shape(prefill(n)) == pytest.approx(1.05 * TRUE.predict_shape(prefill(n)), rel=0.03)
    assert speed_drift(speeds) == pytest.approx(0.1, rel=0.01)
    assert speed_drift([1.3]) == 0.0
    one, (s1,) = fit_passes_like(base, [before])
    assert s1 == pytest.approx(1.0, rel=0.01)
    with pytest.raises(ConfigError, match="needs traced steps"):
        fit_passes_like(base, [before, []])
    with pytest.raises(ConfigError, match="no traced steps"):
        trace_speed(TRUE, [])
    with pytest.raises(ConfigError, match="positive"):
        speed_drift([])


def test_co_busy_fractions_of_overlapping_traces():
    from tokenmill.perf.step_trace import co_busy_fractions

    sh = prefill(100)
    others = [(10.0, sh, 1.0), (11.5, sh, 1.0), (20.0, sh, 0.5)]  # busy 10-11, 11.5-12.5, 20-20.5
    steps = [(10.0, sh, 1.0), (10.5, sh, 2.0), (13.0, sh, 1.0), (19.9, sh, 0.2), (12.4, sh, 0.1)]
    assert co_busy_fractions(steps, others) == pytest.approx([1.0, 0.75, 0.0, 0.5, 1.0])
    assert co_busy_fractions(steps, []) == [0.0] * 5


def test_co_busy_factor_is_fitted_from_steps_that_ran_alone_and_beside_another():
    from tokenmill.perf.step_trace import co_busy_factor

    # the other instance steps in [k, k + 0.5) of every second; this one's steps start anywhere in the second, and
    # run 1.2x the model's time while the other steps (their time: the model's x (1 + 0.2 x co-busy fraction))
    others = [(float(k), prefill(1), 0.5) for k in range(200)]
    steps = []
    for k in range(150):
        sh = prefill(SIZES[k % len(SIZES)])
        s = TRUE.predict_shape(sh)
        start = k + (k % 7) / 7.0
        end_busy = k + 0.5
        frac = max(0.0, min(start + s, end_busy) - start) / s if start < end_busy else 0.0
        steps.append((start, sh, s * (1 + 0.2 * frac)))
    out = co_busy_factor(TRUE, steps, others)
    assert out["factor"] == pytest.approx(1.2, rel=0.02)
    assert out["r"] > 0.9 and out["alone_steps"] > 10 and out["co_busy_steps"] > 10
    assert 0.2 < out["mean_co_busy"] < 0.8
    flat = co_busy_factor(TRUE, [(t, sh, TRUE.predict_shape(sh)) for t, sh, _ in steps], others)
    assert flat["factor"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="equally co-busy"):
        co_busy_factor(TRUE, steps, [(0.0, prefill(1), 1000.0)])
    with pytest.raises(ConfigError, match="too few"):
        co_busy_factor(TRUE, steps[:2], others)
