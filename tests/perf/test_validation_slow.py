"""Predicted vs measured on the default model (CPU, float32): calibrate, then drive the real engine
open-loop with the same requests the simulator gets. Generous bound: within 3x at p50."""
from __future__ import annotations

import random
import time

import pytest

from tokenmill.perf.cost_model import calibrate
from tokenmill.perf.simulator import SimConfig, SimRequest, simulate
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PLAN = ((1, 32, 3), (1, 256, 2), (4, 64, 6), (12, 24, 6), (2, 300, 2))


def drive(engine, reqs: list[SimRequest], vocab: int) -> tuple[list[float], list[float]]:
    """Open-loop: add each request at its arrival time, step the engine; returns (ttfts, tpots) in seconds."""
    rng = random.Random(0)
    t0 = time.monotonic()
    pending = list(enumerate(reqs))
    first: dict[str, float] = {}
    arrive: dict[str, float] = {}
    ttft, tpot = [], []
    while pending or engine.has_unfinished_requests():
        now = time.monotonic()
        while pending and t0 + pending[0][1].arrival_s <= now:
            i, r = pending.pop(0)
            ids = [rng.randrange(1000, vocab - 1000) for _ in range(r.prompt_len)]
            engine.add_request(f"v{i}", None, SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True),
                               prompt_token_ids=ids, arrival_time=t0 + r.arrival_s)
            arrive[f"v{i}"] = t0 + r.arrival_s
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, t0 + pending[0][1].arrival_s - time.monotonic()))
            continue
        for out in engine.step():
            t = time.monotonic()
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = t
                ttft.append(t - arrive[out.request_id])
            if out.finished:
                n = len(out.outputs[0].token_ids)
                tpot.append((t - first[out.request_id]) / (n - 1))
    return ttft, tpot


def test_predicted_latency_within_3x_of_measured():
    from tokenmill.engine.llm import LLM

    llm = LLM(max_num_batched_tokens=512, num_threads=1)  # one thread: robust when other jobs share the CPU
    cost = calibrate(llm, plan=PLAN, max_steps_per_case=6)
    rng = random.Random(1)
    t, reqs = 0.0, []
    for _ in range(8):
        reqs.append(SimRequest(rng.randint(32, 256), rng.randint(8, 24), t))
        t += rng.expovariate(1.0)
    vocab = int(llm.engine.core.runner.hf_config.vocab_size)
    ttft, tpot = drive(llm.engine, reqs, vocab)
    pred = simulate(reqs, cost, SimConfig(max_num_batched_tokens=512, num_blocks=llm.engine.core.runner.num_blocks))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert len(ttft) == len(tpot) == 8
    for measured, predicted in ((med(ttft), med(pred.ttft_s)), (med(tpot), med(pred.tpot_s))):
        assert predicted / 3 <= measured <= predicted * 3, (measured, predicted)
