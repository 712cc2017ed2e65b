"""What a served pass shows beyond the step costs: the first token's way from a prefill instance to the client,
and how the served steps scatter around their cost model (tokenmill/perf/fleet.py: FleetSpec's hop_s /
hop_s_per_request / return_s, StepSpread).

On the 2-core box of bench/results/s19 and s20 (a producer and a consumer, one core each, behind `tokenmill
router`; the router, both API processes and the benchmark client on the same cores), under load:
- the client's first token came 3-4 ms (1 req/s) to ~9 ms (2 req/s) after the consumer's step boundary that took
  the request (its API process and the router's stream): `return_s`. The idle probe's `hop_s` (the prefill step's
  end to the first token, ~10 ms) holds both legs, and the simulator used to put all of it before the consumer's
  boundary, so a request that reached the consumer just before a boundary came out one leg early;
- the requests one prefill step finished reached the consumer together, later the more there were (the
  producer's answers, the router's forwards and the consumer's request handling run one after another): 5-12 ms
  + 2-10 ms per other request (noisy: few passes have many bursts), against which the consumer's next boundary is often missed, costing a whole
  decode step (50-80 ms at 2 req/s);
- between two traced steps the engine loop spent 2-3 ms on the producer (its outputs, the hand-over of the
  prompt's blocks to the KV connector, new requests) and 0.4-0.5 ms on the consumer: 1-2% of a decode step,
  which the trace's step times leave out;
- single served prefill steps took 0.75-1.35x their fitted time (log-sd about 0.1 for steps of 256+ tokens, more
  for short ones), and the producer's speed moved by 2-7% (once 21%) between the calibration pass and the run it
  predicts, which the windows of one pass do not show.

`fit_first_token_path` reads those figures off one served pass (both instances' step traces and the client's
send and first-token times); `step_gap_of_trace` the time between steps; `spread_of_trace` the scatter. Pure
Python; no torch.
"""
from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import CostModel, StepShape
from tokenmill.perf.fleet import StepSpread

# A client's first token counts as a decode boundary's when it came at most this long after it (else the consumer
# was idle and took the request at once).
MAX_RETURN_S = 0.05
SPEED_WINDOW_S = 5.0
MAX_STEP_GAP_S = 0.02


@dataclass(frozen=True)
class FirstTokenPath:
    """The served path between a prefill step's end and the client's first token (FleetSpec's fields)."""

    hop_s: float  # the prefill step's end -> the decode instance's engine, a request alone
    hop_s_per_request: float  # + this per other request the same prefill step finished
    return_s: float  # the decode instance's boundary that took it -> the client's first token
    num_requests: int  # requests the figures come from


def assign_fcfs(step_reqs: Sequence[int], num_requests: int) -> list[int]:
    """Which step ran each request's prompt, for an FCFS prefill instance without chunked prefill: steps in order
    take the next `reqs` requests in send order. Raises ConfigError when the counts do not add up."""
    if sum(step_reqs) != num_requests:
        raise ConfigError(f"the prefill steps ran {sum(step_reqs)} prompts, the client sent {num_requests}: not one "
                          f"whole prompt per request and step (chunked prefill, or other traffic)")
    return [k for k, n in enumerate(step_reqs) for _ in range(n)]


def fit_first_token_path(prefill_steps: Sequence[tuple[float, float, int]], decode_steps: Sequence[tuple[float, float]],
                         requests: Sequence[tuple[float, float]], grid_s: float = 0.0005,
                         max_hop_s: float = 0.06, max_per_request_s: float = 0.02) -> FirstTokenPath:
    """The first-token path from one served pass. prefill_steps: (start, seconds, prompts) of the producer's steps
    in the pass (wall clock); decode_steps: (start, seconds) of the consumer's; requests: (send, TTFT) per request
    (wall clock send, in send order: FCFS). return_s: the median of first token - the last decode boundary before
    it, over requests that came within MAX_RETURN_S of one after their prefill. Each request's arrival at the
    consumer (prefill end + hop_s + hop_s_per_request x other prompts of its step) lies after the boundary before
    the one that took it and no later than that one (or, with the consumer idle, at first token - return_s); hop_s
    and hop_s_per_request minimize the summed distance to those intervals (grid of grid_s; the middle of the
    minimizing set)."""
    if not requests:
        raise ConfigError("no requests to fit the first-token path to")
    which = assign_fcfs([n for _, _, n in prefill_steps], len(requests))
    ends = sorted(t + s for t, s in decode_steps)
    rows = []  # (prefill end, first token, prompts in its step, index of the last decode end before it or -1)
    for (send, ttft), k in zip(requests, which):
        t, s, n = prefill_steps[k]
        p1, first = t + s, send + ttft
        e = bisect.bisect_right(ends, first) - 1
        took = e >= 0 and ends[e] > p1 and first - ends[e] <= MAX_RETURN_S
        rows.append((p1, first, n, e if took else -1))
    backs = [first - ends[e] for _, first, _, e in rows if e >= 0]
    ret = statistics.median(backs) if backs else 0.0
    intervals = []  # (lo, hi, other prompts): the arrival's bounds after the prefill end
    for p1, first, n, e in rows:
        if e >= 0:
            lo = ends[e - 1] - p1 if e > 0 and ends[e - 1] > p1 else 0.0
            intervals.append((lo, ends[e] - p1, n - 1))
        else:
            a = max(0.0, first - ret - p1)
            intervals.append((a, a, n - 1))
    best, arg = math.inf, []
    for i in range(int(round(max_hop_s / grid_s)) + 1):
        h = i * grid_s
        for j in range(int(round(max_per_request_s / grid_s)) + 1):
            c = j * grid_s
            loss = sum(max(0.0, lo - x, x - hi) for lo, hi, m in intervals for x in (h + c * m,))
            if loss < best - 1e-12:
                best, arg = loss, [(h, c)]
            elif loss <= best + 1e-12:
                arg.append((h, c))
    return FirstTokenPath(statistics.fmean(h for h, _ in arg), statistics.fmean(c for _, c in arg), ret,
                          len(requests))


def fit_first_token_path_relative(prefill_steps: Sequence[tuple[float, float, int]],
                                  decode_steps: Sequence[tuple[float, float]], requests: Sequence[tuple[float, float]],
                                  ingress_s: float) -> FirstTokenPath:
    """fit_first_token_path for a client whose send times are relative to its own start (a benchmark's records):
    aligned to the wall clock by the first prefill step, which starts ingress_s after the first send."""
    if not prefill_steps or not requests:
        raise ConfigError("no prefill steps or no requests to fit the first-token path to")
    reqs = sorted(requests)
    offset = min(t for t, _, _ in prefill_steps) - ingress_s - reqs[0][0]
    return fit_first_token_path(sorted(prefill_steps), decode_steps, [(t + offset, f) for t, f in reqs])


def step_gap_of_trace(steps: Sequence[tuple[float, float]], max_gap_s: float = MAX_STEP_GAP_S) -> float:
    """The engine loop's time between two steps when it has work (FleetSpec.step_gap_s / decode_step_gap_s): the
    median of next start - (start + seconds) over consecutive traced steps (start, seconds) less than max_gap_s
    apart (longer gaps are idle time); 0.0 when none are."""
    s = sorted(steps)
    gaps = [b[0] - a[0] - a[1] for a, b in zip(s, s[1:]) if 0.0 <= b[0] - a[0] - a[1] < max_gap_s]
    return statistics.median(gaps) if gaps else 0.0


def spread_of_trace(model: CostModel, samples: Sequence[tuple[StepShape, float]],
                    starts: Optional[Sequence[float]] = None, window_s: float = SPEED_WINDOW_S) -> StepSpread:
    """The scatter of traced steps around `model`: every step's (tokens, measured / predicted) as the residuals
    the simulator draws from, and speed_sigma, the log-sd of the time-weighted ratio between windows of window_s
    (starts: the steps' wall-clock starts; without them, 0) less what the steps' own scatter explains."""
    if not samples:
        raise ConfigError("no traced steps to take the spread from")
    res = tuple((s.num_tokens, t / model.predict_shape(s)) for s, t in samples)
    speed = 0.0
    if starts is not None and len(starts) == len(samples):
        wins: dict[int, list[tuple[float, float]]] = {}
        t0 = min(starts)
        for (s, t), st in zip(samples, starts):
            wins.setdefault(int((st - t0) // window_s), []).append((t, model.predict_shape(s)))
        logs, own = [], []
        step_var = statistics.pvariance([math.log(r) for _, r in res]) if len(res) > 1 else 0.0
        for w in wins.values():
            pred = sum(p for _, p in w)
            if len(w) >= 2:
                logs.append(math.log(sum(t for t, _ in w) / pred))
                own.append(step_var * sum(p * p for _, p in w) / pred ** 2)  # a window mean's share of it
        if len(logs) >= 3:
            speed = math.sqrt(max(0.0, statistics.variance(logs) - statistics.fmean(own)))
    return StepSpread(speed_sigma=min(speed, 1.0), residuals=res)
