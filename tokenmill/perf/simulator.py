"""Discrete-event serving simulator: the real tokenmill.core Scheduler on a simulated clock.

Each step: requests that arrived by `now` are added, the Scheduler schedules, the cost model says how
long the step takes, the clock advances, and a scripted runner samples one token for every request
whose prompt is fully computed (outputs have the workload's lengths: ignore-eos semantics).
Gives TTFT / TPOT / e2e percentiles, throughput and goodput (DistServe: requests/s meeting both SLOs).
Pure Python: thousands of requests in seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from tokenmill.config import SchedulerConfig
from tokenmill.core.outputs import ModelRunnerOutput
from tokenmill.core.policies import Policy, make_policy
from tokenmill.core.scheduler import Scheduler
from tokenmill.errors import ConfigError, TokenmillError
from tokenmill.perf.cost_model import CostModel, shape_of_schedule
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SLO, SamplingParams

_TOKEN = 11  # the scripted runner's sampled token (never an EOS: no EOS ids are given)


@dataclass(frozen=True)
class SimRequest:
    """One arrival: prompt and output lengths (tokens), optional per-request targets."""

    prompt_len: int
    output_len: int
    arrival_s: float = 0.0
    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    priority: int = 0


@dataclass
class SimResult:
    rate: float
    num_requests: int
    completed: int
    rejected: int
    duration_s: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    good: int = 0
    output_tokens: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    # per completed request: (prompt tokens, output tokens, ttft s, tpot s or None, met both SLOs)
    records: list[tuple[int, int, float, Optional[float], bool]] = field(default_factory=list)

    @property
    def goodput(self) -> float:
        return self.good / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def slo_attainment(self) -> float:
        return self.good / self.num_requests if self.num_requests else 0.0

    def summary(self) -> dict[str, Any]:
        return {"rate": self.rate, "num_requests": self.num_requests, "completed": self.completed,
                "rejected": self.rejected, "duration_s": self.duration_s,
                "request_throughput": self.completed / self.duration_s if self.duration_s else 0.0,
                "output_throughput": self.output_tokens / self.duration_s if self.duration_s else 0.0,
                "ttft_ms": _stats(self.ttft_s), "tpot_ms": _stats(self.tpot_s), "e2e_ms": _stats(self.e2e_s),
                "good_requests": self.good, "slo_attainment": self.slo_attainment, "goodput": self.goodput,
                "num_steps": self.num_steps, "num_preemptions": self.num_preemptions}


def _pct(sorted_vals: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default) of sorted values."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    k = (len(sorted_vals) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _stats(values_s: list[float]) -> dict[str, Optional[float]]:
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    v = sorted(x * 1e3 for x in values_s)
    return {"mean": sum(v) / len(v), "p50": _pct(v, 50), "p90": _pct(v, 90), "p99": _pct(v, 99), "max": v[-1],
            "n": len(v)}


def requests_from_workload(spec: str, num: int, rate: float, seed: int = 0, tokenizer: Any = None,
                           chat_overhead: int = 0) -> list[SimRequest]:
    """SimRequests from a tokenmill.bench workload spec (token counts as the bench client estimates them).

    Multi-turn conversations become one request per turn (later turns carry the growing history).
    `chat_overhead`: tokens the chat template adds to each prompt (system message, role tags).
    """
    from tokenmill.bench.serve import arrival_times
    from tokenmill.bench.workloads import get_workload

    arrivals = arrival_times(rate, seed=seed, num=num)  # the same arrivals `bench serve` sends
    convs = get_workload(spec, tokenizer=tokenizer, seed=seed).generate(len(arrivals), seed)
    out = []
    for conv, t in zip(convs, arrivals):
        history = 0
        for turn in conv.turns:
            t_arr = turn.delay_s if turn.delay_s is not None else t
            n_in = history + max(1, turn.prompt_len) + chat_overhead
            out.append(SimRequest(n_in, max(1, turn.max_tokens), t_arr, turn.ttft_ms, turn.tpot_ms,
                                  turn.priority or 0))
            history = n_in + turn.max_tokens
    out.sort(key=lambda r: r.arrival_s)
    return out


@dataclass
class SimConfig:
    """Engine settings the simulation runs with."""

    num_blocks: int = 4096
    block_size: int = 16
    max_model_len: int = 8192
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"
    enable_prefix_caching: bool = False
    long_prefill_token_threshold: int = 0
    max_long_partial_prefills: int = 1
    slo_reject: bool = False


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(requests: list[SimRequest], cost: CostModel, cfg: SimConfig, slo_ttft_ms: Optional[float] = None,
             slo_tpot_ms: Optional[float] = None, rate: float = 0.0, policy: Optional[Policy] = None,
             step_overhead_s: float = 0.0, max_sim_s: float = 1e6, step_scale: float = 1.0) -> SimResult:
    """Run the requests through the real Scheduler with step times from `cost`; returns measured latencies.

    slo_*: global targets (per-request targets win), used for goodput and given to the slo policy.
    step_overhead_s: extra seconds per step (serving-layer cost not in the calibration).
    step_scale: the device runs this many times slower than `cost` predicts (a stale calibration, or a server
    whose own threads share the cores); the slo policy still plans with `cost`, as a server would.
    """
    sched_cfg = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                                policy=cfg.policy, long_prefill_token_threshold=cfg.long_prefill_token_threshold,
                                max_long_partial_prefills=cfg.max_long_partial_prefills, slo_reject=cfg.slo_reject)
    if policy is None:
        policy = make_policy(cfg.policy, slo_reject=cfg.slo_reject, default_ttft_ms=slo_ttft_ms,
                             default_tpot_ms=slo_tpot_ms, cost_model=cost)
    clock = _Clock()
    sched = Scheduler(sched_cfg, cfg.num_blocks, cfg.block_size, cfg.max_model_len, cfg.enable_prefix_caching,
                      policy=policy, clock=clock)
    reqs: list[Request] = []
    targets: list[tuple[Optional[float], Optional[float]]] = []
    finish: dict[str, float] = {}
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    nxt = 0
    rejected = 0
    steps = 0
    while nxt < len(pending) or sched.has_work():
        while nxt < len(pending) and requests[pending[nxt]].arrival_s <= clock.t:
            i = pending[nxt]
            r = requests[i]
            n_in = min(r.prompt_len, cfg.max_model_len - 1)
            n_out = max(1, min(r.output_len, cfg.max_model_len - n_in))
            slo = SLO(ttft_ms=r.ttft_ms, tpot_ms=r.tpot_ms) if (r.ttft_ms or r.tpot_ms) else None
            params = SamplingParams(max_tokens=n_out, ignore_eos=True, priority=r.priority, slo=slo)
            base = 100 + 7919 * i
            req = Request(f"r{i}", [(base + j) % 49000 + 100 for j in range(n_in)], params, (), r.arrival_s, n_out)
            reqs.append(req)
            targets.append((r.ttft_ms if r.ttft_ms is not None else slo_ttft_ms,
                            r.tpot_ms if r.tpot_ms is not None else slo_tpot_ms))
            try:
                sched.add_request(req)
            except TokenmillError:
                req.status = RequestStatus.FINISHED_ABORTED
                rejected += 1
            nxt += 1
        if not sched.has_work():
            clock.t = requests[pending[nxt]].arrival_s
            continue
        out = sched.schedule()
        if out.total_num_scheduled_tokens == 0:
            if nxt < len(pending):
                clock.t = max(clock.t, requests[pending[nxt]].arrival_s)
                continue
            if not sched.has_unfinished_requests():
                continue
            raise RuntimeError("simulation stalled: the scheduler scheduled nothing with requests left")
        clock.t += cost.predict_shape(shape_of_schedule(out)) * step_scale + step_overhead_s
        steps += 1
        ids, toks = [], []
        for rid, _n in out.num_scheduled_tokens.items():
            r = sched.requests[rid]
            ids.append(rid)
            toks.append([_TOKEN] if r.num_computed_tokens >= r.num_tokens else [])
        for o in sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=toks,
                                                                 logprobs=[None] * len(ids))):
            if o.finished:
                finish[o.req_id] = clock.t
        if clock.t > max_sim_s:
            break
    res = SimResult(rate=rate, num_requests=len(requests), completed=0, rejected=rejected, duration_s=0.0,
                    num_steps=steps, num_preemptions=sched.num_preemptions)
    end = 0.0
    for req, (t_ttft, t_tpot) in zip(reqs, targets):
        if req.request_id not in finish or req.status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR):
            continue
        res.completed += 1
        ttft = req.first_token_time - req.arrival_time
        e2e = finish[req.request_id] - req.arrival_time
        end = max(end, finish[req.request_id])
        res.ttft_s.append(ttft)
        res.e2e_s.append(e2e)
        res.output_tokens += req.num_output_tokens
        tpot = (e2e - ttft) / (req.num_output_tokens - 1) if req.num_output_tokens > 1 else None
        if tpot is not None:
            res.tpot_s.append(tpot)
        ok = (t_ttft is None or ttft * 1e3 <= t_ttft) and (t_tpot is None or tpot is None or tpot * 1e3 <= t_tpot)
        res.good += ok
        res.records.append((req.num_prompt_tokens, req.num_output_tokens, ttft, tpot, ok))
    res.rejected = len(requests) - res.completed
    res.duration_s = max(end, 1e-9)  # from the run's start (t = 0), as `bench serve` measures
    return res
