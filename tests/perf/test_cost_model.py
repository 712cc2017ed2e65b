"""Cost model: the fit recovers known device constants; JSON round trip; shapes from real scheduler outputs."""
from __future__ import annotations

import json
import random

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.core.scheduler import Scheduler
from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import CostModel, ModelSpec, StepShape, shape_of_schedule
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams

SPEC = ModelSpec(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                 vocab_size=49152)


def test_spec_counts_smollm2():
    assert SPEC.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4
    # 106M in the layers + 28M tied embedding / LM head = SmolLM2's 135M
    assert SPEC.layer_params == 106_168_320 and SPEC.lm_head_params == 28_311_552


def shapes(rng: random.Random, n: int) -> list[StepShape]:
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:  # decode batch
            b = rng.randint(1, 64)
            out.append(StepShape.of([(rng.randint(10, 2000), 1) for _ in range(b)]))
        elif kind < 0.8:  # one prefill chunk
            out.append(StepShape.of([(rng.choice([0, 512]), rng.randint(16, 2048))]))
        else:  # mixed
            out.append(StepShape.of([(rng.randint(10, 500), 1) for _ in range(rng.randint(1, 16))]
                                    + [(0, rng.randint(16, 512))]))
    return out


def test_fit_recovers_device_constants():
    truth = CostModel(SPEC, bandwidth=40e9, matmul_rate=300e9, o_step=4e-3, o_req=2e-4, o_tok=1e-5, o_pair=2e-9)
    rng = random.Random(0)
    samples = [(s, truth.predict_shape(s) * rng.uniform(0.98, 1.02)) for s in shapes(rng, 80)]
    fitted = CostModel.prior(SPEC)
    stats = fitted.fit(samples)
    assert stats["median_rel_error"] < 0.03
    assert fitted.bandwidth == pytest.approx(40e9, rel=0.15)
    assert fitted.matmul_rate == pytest.approx(300e9, rel=0.15)
    assert fitted.o_step == pytest.approx(4e-3, rel=0.3)
    for s in shapes(random.Random(1), 20):  # generalizes to unseen shapes
        assert fitted.predict_shape(s) == pytest.approx(truth.predict_shape(s), rel=0.06)


def test_fit_recovers_the_kv_read_term():
    """Decodes over long contexts pay per context token read (o_kv), on top of the overheads: the fit finds it,
    and a model without it under-predicts those steps."""
    truth = CostModel(SPEC, bandwidth=0.0, matmul_rate=0.0, o_step=10e-3, o_req=5e-4, o_tok=2.5e-4, o_pair=4e-7,
                      o_kv=4e-6)
    rng = random.Random(3)
    samples = [(s, truth.predict_shape(s) * rng.uniform(0.98, 1.02)) for s in shapes(rng, 80)]
    samples += [(StepShape.of([(rng.randint(300, 1500), 1) for _ in range(rng.randint(4, 16))]), 0.0)
                for _ in range(20)]
    samples = [(s, t or truth.predict_shape(s)) for s, t in samples]
    fitted = CostModel.prior(SPEC)
    fitted.fit(samples)
    assert fitted.o_kv == pytest.approx(4e-6, rel=0.25)
    long_decode = StepShape.of([(1000, 1)] * 8)
    assert fitted.predict_shape(long_decode) == pytest.approx(truth.predict_shape(long_decode), rel=0.1)
    assert CostModel.from_dict({k: v for k, v in fitted.to_dict().items() if k != "o_kv"}).o_kv == 0.0  # old files


def test_fit_recovers_kernel_regimes():
    """The CPU engine changes kernels at 4 and 64 tokens: each regime has its own fixed cost, cost per token and
    matmul rate. With the bounds the fit recovers all three; one line through them mispredicts badly."""
    truth = CostModel(SPEC, bandwidth=20e9, matmul_rate=800e9, o_step=3e-3, o_req=1e-4, o_tok=2e-5,
                      small_regimes=((4, 1e-3, 1e-4, 0.0), (64, 9e-3, 5e-4, 90e9)))
    rng = random.Random(2)
    samples = [(s, truth.predict_shape(s) * rng.uniform(0.98, 1.02)) for s in shapes(rng, 120)]
    samples += [(StepShape.of([(rng.randint(10, 900), 1)] * rng.randint(1, 3)), 0.0) for _ in range(12)]
    samples = [(s, t or truth.predict_shape(s)) for s, t in samples]
    assert {truth._regime_index(s.num_tokens) for s, _ in samples} == {0, 1, 2}
    three = CostModel.prior(SPEC).with_switch_tokens([64, 4])
    assert three.switch_tokens == (4, 64)
    assert three.fit(samples)["median_rel_error"] < 0.03
    assert three.matmul_rate == pytest.approx(800e9, rel=0.2)
    assert three.small_regimes[1][3] == pytest.approx(90e9, rel=0.2)
    assert three.small_regimes[1][1] == pytest.approx(9e-3, rel=0.3)
    one = CostModel.prior(SPEC)
    assert one.fit(samples)["max_rel_error"] > 0.3
    for s in shapes(random.Random(3), 30) + [StepShape.of([(500, 1)] * b) for b in (1, 2, 3, 4, 6)]:
        assert three.predict_shape(s) == pytest.approx(truth.predict_shape(s), rel=0.08)


def test_fit_merges_regimes_without_samples():
    """A bound no timed step falls below (or above) is dropped rather than fit to nothing."""
    truth = CostModel(SPEC, bandwidth=20e9, matmul_rate=800e9, o_step=3e-3, o_req=1e-4, o_tok=2e-5)
    rng = random.Random(5)
    samples = [(StepShape.of([(rng.randint(0, 500), rng.randint(100, 900))]), 0.0) for _ in range(20)]
    samples = [(s, truth.predict_shape(s)) for s, _ in samples]
    m = CostModel.prior(SPEC).with_switch_tokens([4, 64, 4096])
    m.fit(samples)
    assert m.switch_tokens == ()
    assert m.predict(2, 2, 100, 100) > 0


def test_prediction_regimes():
    m = CostModel(SPEC, bandwidth=40e9, matmul_rate=300e9)
    one = m.predict(1, 1, 100, 100)
    # a decode step is memory bound: weights over bandwidth
    assert one == pytest.approx(SPEC.weight_bytes / 40e9, rel=0.05)
    # a large prefill is compute bound and grows about linearly in tokens
    a, b = m.predict(1024, 1, 1024, 1024 * 1025 // 2), m.predict(2048, 1, 2048, 2048 * 2049 // 2)
    assert a > one and 1.9 < b / a < 2.6
    assert m.predict(0, 0, 0, 0) == 0.0


def test_save_load_roundtrip(tmp_path):
    m = CostModel(SPEC, bandwidth=1e10, matmul_rate=2e11, o_step=1e-3, o_req=2e-5, info={"calibrated": True})
    p = tmp_path / "cal.json"
    m.save(str(p))
    back = CostModel.load(str(p))
    assert back == m and back.predict(100, 3, 500, 9000) == m.predict(100, 3, 500, 9000)
    old = m.to_dict()  # a file from before the kernel regimes existed still loads (one regime)
    del old["small_regimes"]
    p.write_text(json.dumps(old))
    assert CostModel.load(str(p)) == m
    s5 = {**old, "small_step_tokens": 64, "matmul_rate_small": 9e10}  # session 5's two-regime files
    p.write_text(json.dumps(s5))
    back = CostModel.load(str(p))
    assert back.small_regimes == ((64, 1e-3, 0.0, 9e10),) and back.regime(10) == (1e-3, 0.0, 9e10)
    assert back.regime(64) == (1e-3, 0.0, 2e11)
    three = CostModel(SPEC, 1e10, 2e11, o_step=1e-3, small_regimes=((4, 1e-4, 2e-3, 0.0), (64, 5e-3, 1e-4, 5e10)))
    three.save(str(p))
    assert CostModel.load(str(p)) == three
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError):
        CostModel.load(str(p))
    with pytest.raises(ConfigError):
        CostModel.load(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError):
        CostModel.prior(SPEC).fit([])


def test_shape_of_real_schedule():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100), 64, 16, 1024, False)
    s.add_request(Request("a", list(range(10, 40)), SamplingParams(max_tokens=4), (), 0.0))
    out = s.schedule()
    assert shape_of_schedule(out) == StepShape(num_tokens=30, num_reqs=1, kv_tokens_read=30, attn_pairs=30 * 31 // 2)
    from tokenmill.core.outputs import ModelRunnerOutput

    s.update_from_output(out, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[5]], logprobs=[None]))
    s.add_request(Request("b", list(range(100, 150)), SamplingParams(max_tokens=4), (), 0.0))
    out = s.schedule()
    # a decodes one token at context 30; b prefills 50
    assert shape_of_schedule(out) == StepShape(51, 2, 31 + 50, 31 + 50 * 51 // 2)
