"""The first-token path and the step scatter read off a served pass (tokenmill/perf/served_path.py)."""
from __future__ import annotations

import bisect
import math
import random
import subprocess
import sys

import pytest

from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import CostModel, ModelSpec, StepShape
from tokenmill.perf.served_path import (assign_fcfs, fit_first_token_path, fit_first_token_path_relative,
                                        spread_of_trace, step_gap_of_trace)

SPEC = ModelSpec(30, 576, 9, 3, 64, 1536, 49152)
CPU = CostModel(SPEC, bandwidth=20e9, matmul_rate=1.3e12, o_step=0.004, o_req=0.0003, o_tok=0.0001)


def _served_pass(hop: float, per_req: float, ret: float, seed: int = 0, idle_decode: bool = False):
    """A synthetic pass: prefill steps of 1-3 prompts, a decode instance stepping 30-80 ms steps throughout (or
    never), each request taken at the first decode boundary at or after its arrival, its first token ret later."""
    rng = random.Random(seed)
    decode, t = [], 0.0
    while t < 60.0 and not idle_decode:
        s = rng.uniform(0.03, 0.08)
        decode.append((t, s))
        t += s
    ends = [a + s for a, s in decode]
    prefill, reqs, t = [], [], 0.5
    for _ in range(50):
        k = rng.choice((1, 1, 1, 2, 3))
        s = rng.uniform(0.08, 0.4)
        prefill.append((t, s, k))
        arrive = t + s + hop + per_req * (k - 1)
        taken = ends[bisect.bisect_left(ends, arrive)] if ends else arrive
        for _ in range(k):
            send = t - 0.007 - rng.uniform(0, 0.05)
            reqs.append((send, taken + ret - send))
        t += s + rng.uniform(0.0, 0.6)
    reqs.sort()
    return prefill, decode, reqs


def test_fit_recovers_hop_burst_and_return():
    prefill, decode, reqs = _served_pass(0.007, 0.004, 0.009)
    p = fit_first_token_path(prefill, decode, reqs)
    assert p.num_requests == len(reqs)
    assert p.return_s == pytest.approx(0.009, abs=1e-9)
    assert p.hop_s == pytest.approx(0.007, abs=0.002)
    assert p.hop_s_per_request == pytest.approx(0.004, abs=0.002)


def test_relative_send_times_are_aligned_by_the_first_prefill_step():
    """A benchmark's records count from its own start: shifted by the first step's start less ingress."""
    prefill, decode, reqs = _served_pass(0.007, 0.004, 0.009, seed=2)
    first_send = reqs[0][0]
    prefill = [(t, s, k) for t, s, k in prefill]
    prefill[0] = (first_send + 0.007, prefill[0][1], prefill[0][2])  # the first prompt: ingress after its send
    exact = fit_first_token_path(prefill, decode, reqs)
    rel = fit_first_token_path_relative(prefill, decode, [(t - first_send + 3.0, f) for t, f in reqs[::-1]], 0.007)
    assert rel == exact


def test_fit_with_an_idle_decode_instance_reads_the_whole_way():
    """No decode boundary between the prefill and the first token: the consumer took the request at once; with no
    return leg measured (return_s 0), hop_s is the whole way, as the idle probe measures it."""
    prefill, decode, reqs = _served_pass(0.010, 0.0, 0.0, seed=1, idle_decode=True)
    p = fit_first_token_path(prefill, decode, reqs)
    assert p.return_s == 0.0
    assert p.hop_s == pytest.approx(0.010, abs=0.001) and p.hop_s_per_request == pytest.approx(0.0, abs=0.001)


def test_fcfs_assignment_and_its_checks():
    assert assign_fcfs([1, 3, 2], 6) == [0, 1, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="chunked prefill"):
        assign_fcfs([1, 2], 4)
    with pytest.raises(ConfigError):
        fit_first_token_path([], [], [])


def test_spread_of_trace_residuals_and_speed_drift():
    rng = random.Random(3)
    shapes = [StepShape(n, 1, n, n * (n + 1) // 2) for n in (80, 200, 400, 800)]
    samples, starts, t = [], [], 0.0
    for w in range(12):  # 12 windows of 5 s, the machine 10% slower or faster in turn
        speed = 1.1 if w % 2 else 1 / 1.1
        while t < 5.0 * (w + 1):
            sh = rng.choice(shapes)
            secs = CPU.predict_shape(sh) * speed * math.exp(rng.gauss(0, 0.02))
            samples.append((sh, secs))
            starts.append(t)
            t += secs + 0.05
    sp = spread_of_trace(CPU, samples, starts)
    assert len(sp.residuals) == len(samples)
    assert all(n == s.num_tokens and r == pytest.approx(secs / CPU.predict_shape(s))
               for (n, r), (s, secs) in zip(sp.residuals, samples))
    assert sp.speed_sigma == pytest.approx(math.log(1.1), rel=0.25)
    steady = [(s, CPU.predict_shape(s) * math.exp(rng.gauss(0, 0.1))) for s, _ in samples]
    assert spread_of_trace(CPU, steady, starts).speed_sigma < 0.03
    assert spread_of_trace(CPU, steady).speed_sigma == 0.0  # no start times: no windows
    with pytest.raises(ConfigError):
        spread_of_trace(CPU, [])


def test_step_gap_is_the_busy_time_between_steps():
    steps, t = [], 0.0
    for k in range(30):
        steps.append((t, 0.05))
        t += 0.05 + (0.003 if k % 10 else 0.5)  # every tenth gap is idle time
    assert step_gap_of_trace(steps[::-1]) == pytest.approx(0.003)
    assert step_gap_of_trace([(0.0, 0.1), (1.0, 0.1)]) == 0.0


def test_no_torch():
    code = "import sys; sys.modules['torch'] = None; import tokenmill.perf.served_path"
    subprocess.run([sys.executable, "-c", code], check=True)
