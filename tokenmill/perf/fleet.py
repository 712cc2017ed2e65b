"""Fleet simulation: N engine instances behind a router, colocated or disaggregated (DistServe).

colocated       every instance runs prefill and decode: the real tokenmill.core Scheduler per instance on
                a simulated clock (as perf/simulator.py), all instances stepped together so that the router
                policy (tokenmill/router/policy.py, the same module the router runs) sees each instance's
                running / waiting / KV figures at the moment a request arrives.
disaggregated   P prefill instances run each prompt (the real Scheduler, one output token); the request then
                reaches one of D decode instances hop_s later (the router's second hop), plus
                hop_s_per_request for each other request the same prefill step finished (their answers,
                forwards and the decode side's request handling run one after another on shared cores, and
                the burst arrives together); the decode instance takes it at its next step boundary (the
                engine loop takes new requests between steps) and its first token reaches the client
                return_s later (the decode instance's API process and the router's stream: TTFT ends
                there); a request is admitted when its blocks (prompt + output) fit, its KV is pulled
                (transfer_s_per_pull + transfer_s_per_block per block) while the instance steps its other
                requests, and it joins the batch at the first step after the pull; each step every joined
                request produces a token, step time from the cost model with the batch's context lengths.

Step-time spread (StepSpread): served steps scatter around the cost model (per step: the traced steps' own
residuals, or a log-normal; and each instance's speed over a run). Queueing turns that scatter into a longer and
wider TTFT tail, and the median of a few dozen requests at moderate load falls between the unqueued and the queued
requests, where two slow steps moved it by 19% (bench/results/s20). simulate_fleet(spread=, seed=) draws one such
run (factors of mean 1); fleet_replicates() runs many and gives each figure's median and 10-90% band over runs:
what one measured run should fall within, as far as the scatter goes. Engine loops spend step_gap_s /
decode_step_gap_s between steps (outputs, new requests), which a step trace's step times leave out.

Every request reaches an instance's scheduler ingress_s after the client sends it (HTTP, chat template, tokenizing,
the hand-off to the engine process); TTFT counts from the send.

Goodput per instance is DistServe's figure: the highest request rate at which >= 90% of requests meet both
SLOs, divided by the number of instances. Pure Python; no torch.
"""
from __future__ import annotations

import bisect
import math
import random
import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tokenmill.config import SchedulerConfig
from tokenmill.core.outputs import ModelRunnerOutput
from tokenmill.core.policies import make_policy as make_queue_policy
from tokenmill.core.scheduler import Scheduler
from tokenmill.errors import ConfigError, TokenmillError
from tokenmill.perf.cost_model import CostModel, shape_of_schedule
from tokenmill.perf.simulator import SimConfig, SimRequest, SimResult, _Clock, _pct
from tokenmill.request import Request, RequestStatus
from tokenmill.router.policy import BackendLoad, RoutingPolicy, make_policy, prompt_block_hashes
from tokenmill.sampling_params import SamplingParams

_TOKEN = 11
FLEET_POLICIES = ("round-robin", "least-load", "prefix")


@dataclass(frozen=True)
class FleetSpec:
    instances: int
    prefill_instances: int = 0  # 0: colocated; else this many prefill and the rest decode
    router_policy: str = "least-load"
    transfer_s_per_block: float = 0.0  # KV transfer prefill -> decode, seconds per block
    transfer_s_per_pull: float = 0.0  # and seconds per transfer (connection, header)
    hop_s: float = 0.0  # prefill step's end -> the decode instance's engine (router, the decode side's request
    # handling; with return_s = 0, as before s20, the whole way to the client's first token)
    ingress_s: float = 0.0  # client's send -> the (first) instance's scheduler: HTTP, chat template, tokenizing
    hop_s_per_request: float = 0.0  # added to hop_s per other request finished by the same prefill step
    return_s: float = 0.0  # the decode instance's first token -> the client (its API process, the router's stream)
    step_gap_s: float = 0.0  # the engine loop's time between two steps of a (prefill or colocated) instance
    decode_step_gap_s: float = 0.0  # and of a decode instance (a step trace: the next start - this end)

    def validate(self) -> None:
        if self.instances < 1:
            raise ConfigError(f"instances must be at least 1, got {self.instances}")
        if self.prefill_instances and not 1 <= self.prefill_instances < self.instances:
            raise ConfigError(f"prefill_instances must be in [1, {self.instances - 1}] (or 0: colocated), got "
                              f"{self.prefill_instances}")
        if self.router_policy not in FLEET_POLICIES:
            raise ConfigError(f"unknown router policy {self.router_policy!r} (choose from "
                              f"{', '.join(FLEET_POLICIES)})")
        for what, v in (("transfer cost per block", self.transfer_s_per_block),
                        ("transfer cost per pull", self.transfer_s_per_pull), ("hop time", self.hop_s),
                        ("ingress time", self.ingress_s), ("hop time per request", self.hop_s_per_request),
                        ("return time", self.return_s), ("step gap", self.step_gap_s),
                        ("decode step gap", self.decode_step_gap_s)):
            if not v >= 0:
                raise ConfigError(f"{what} must be >= 0, got {v}")

    def transfer_s(self, prompt_blocks: int) -> float:
        return self.transfer_s_per_pull + self.transfer_s_per_block * prompt_blocks

    @property
    def label(self) -> str:
        if not self.prefill_instances:
            return f"colocated x{self.instances}"
        return f"{self.prefill_instances}P + {self.instances - self.prefill_instances}D"


@dataclass(frozen=True)
class StepSpread:
    """How an instance's served steps scatter around its cost model. Each step's time is multiplied by a factor of
    mean 1: drawn from `residuals` when given (measured / predicted time of traced steps, as (step tokens, ratio);
    a step draws from the RESIDUAL_NEIGHBOURS traced steps nearest its size, their mean taken out, so the tails
    are the served steps' own), else log-normal with log-sd step_sigma; all of an instance's steps in one run are
    also multiplied by a log-normal factor of log-sd speed_sigma (the machine's speed over a run, which drifts
    between a calibration and the run it predicts)."""

    step_sigma: float = 0.0
    speed_sigma: float = 0.0
    residuals: tuple[tuple[int, float], ...] = ()

    def validate(self) -> None:
        for what, v in (("step sigma", self.step_sigma), ("speed sigma", self.speed_sigma)):
            if not 0 <= v < 2:
                raise ConfigError(f"{what} must be in [0, 2), got {v}")
        if any(not (n > 0 and r > 0) for n, r in self.residuals):
            raise ConfigError("step residuals must be (tokens > 0, ratio > 0) pairs")


RESIDUAL_NEIGHBOURS = 16


def _lognormal(rng: random.Random, sigma: float) -> float:
    """A log-normal factor of mean 1 (1.0 without drawing when sigma is 0)."""
    return math.exp(rng.gauss(-sigma * sigma / 2, sigma)) if sigma > 0 else 1.0


class _Jitter:
    """One instance's step-time factors in one simulated run (1.0 throughout without a spread)."""

    def __init__(self, spread: Optional[StepSpread], rng: random.Random):
        self.spread, self.rng = spread, rng
        self.speed = _lognormal(rng, spread.speed_sigma) if spread else 1.0
        res = sorted(spread.residuals) if spread else []
        self.tokens = [n for n, _ in res]
        self.ratios = [r for _, r in res]
        self.pools: dict[int, tuple[list[float], float]] = {}  # first neighbour index -> (ratios, their mean)

    def __call__(self, num_tokens: int = 1) -> float:
        if self.spread is None:
            return 1.0
        if not self.ratios:
            return self.speed * _lognormal(self.rng, self.spread.step_sigma)
        k = min(RESIDUAL_NEIGHBOURS, len(self.ratios))
        i = bisect.bisect_left(self.tokens, num_tokens)
        lo = max(0, min(i - k // 2, len(self.ratios) - k))
        while lo > 0 and num_tokens - self.tokens[lo - 1] < self.tokens[lo + k - 1] - num_tokens:
            lo -= 1
        while lo + k < len(self.ratios) and self.tokens[lo + k] - num_tokens < num_tokens - self.tokens[lo]:
            lo += 1
        if lo not in self.pools:
            pool = self.ratios[lo:lo + k]
            self.pools[lo] = (pool, sum(pool) / k)
        pool, mean = self.pools[lo]
        return self.speed * self.rng.choice(pool) / mean


def _token_ids(i: int, n: int) -> list[int]:
    base = 100 + 7919 * i  # as simulate(): no two requests share a prefix
    return [(base + j) % 49000 + 100 for j in range(n)]


class InstanceSim:
    """One instance: the real Scheduler on its own clock, stepped up to a given time."""

    def __init__(self, cost: CostModel, cfg: SimConfig, slo_ttft_ms: Optional[float], slo_tpot_ms: Optional[float],
                 jitter: Optional[_Jitter] = None, gap_s: float = 0.0):
        sc = SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                             policy=cfg.policy, long_prefill_token_threshold=cfg.long_prefill_token_threshold,
                             max_long_partial_prefills=cfg.max_long_partial_prefills, slo_reject=cfg.slo_reject)
        qp = make_queue_policy(cfg.policy, slo_reject=cfg.slo_reject, default_ttft_ms=slo_ttft_ms,
                               default_tpot_ms=slo_tpot_ms, cost_model=cost)
        self.cost, self.cfg, self.gap_s = cost, cfg, gap_s
        self.jitter = jitter or _Jitter(None, random.Random(0))
        self.clock = _Clock()
        self.sched = Scheduler(sc, cfg.num_blocks, cfg.block_size, cfg.max_model_len, cfg.enable_prefix_caching,
                               policy=qp, clock=self.clock)
        self.reqs: dict[str, Request] = {}
        self.finish: dict[str, float] = {}
        self.first_step: dict[str, tuple[float, float]] = {}  # (start, end) of the step that sampled its 1st token
        self.steps = 0

    def load(self) -> BackendLoad:
        kv = self.sched.kv
        usage = kv.num_used_blocks / kv.num_total_blocks if kv.num_total_blocks else 0.0
        return BackendLoad(self.sched.num_running, self.sched.num_waiting, usage)

    def add(self, rid: str, token_ids: list[int], n_out: int, arrival_s: float) -> None:
        req = Request(rid, token_ids, SamplingParams(max_tokens=n_out, ignore_eos=True), (), arrival_s, n_out)
        self.reqs[rid] = req
        try:
            self.sched.add_request(req)
        except TokenmillError:
            req.status = RequestStatus.FINISHED_ABORTED

    def advance_to(self, t: float) -> None:
        while self.clock.t < t and self.sched.has_work() and self.step():
            pass
        self.clock.t = max(self.clock.t, t)

    def drain(self, max_s: float) -> None:
        while self.sched.has_work() and self.clock.t < max_s:
            if not self.step() and self.sched.has_unfinished_requests():
                raise RuntimeError("simulation stalled: the scheduler scheduled nothing with requests left")

    def step(self) -> bool:
        """One step; False when nothing was scheduled."""
        out = self.sched.schedule()
        if out.total_num_scheduled_tokens == 0:
            return False
        shape = shape_of_schedule(out)
        start = self.clock.t
        self.clock.t += self.cost.predict_shape(shape) * self.jitter(shape.num_tokens)
        self.steps += 1
        ids, toks = [], []
        for rid in out.num_scheduled_tokens:
            r = self.sched.requests[rid]
            ids.append(rid)
            toks.append([_TOKEN] if r.num_computed_tokens >= r.num_tokens else [])
            if toks[-1] and rid not in self.first_step:
                self.first_step[rid] = (start, self.clock.t)
        for o in self.sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, sampled_token_ids=toks,
                                                                      logprobs=[None] * len(ids))):
            if o.finished:
                self.finish[o.req_id] = self.clock.t
        self.clock.t += self.gap_s  # the engine loop's bookkeeping before it can take requests or step again
        return True


class DecodeSim:
    """A decode-only instance: requests arrive with their first token; FCFS admission while max_num_seqs and the
    KV blocks allow, then the pull (transfer_s), then each step decodes one token for every pulled request."""

    def __init__(self, cost: CostModel, cfg: SimConfig, jitter: Optional[_Jitter] = None, gap_s: float = 0.0):
        self.cost, self.cfg, self.gap_s = cost, cfg, gap_s
        self.jitter = jitter or _Jitter(None, random.Random(0))
        self.t = 0.0
        self.queue: list[tuple[str, int, int, float]] = []  # (rid, context, tokens left, transfer s)
        self.active: list[list] = []  # [rid, context, tokens left, blocks, KV ready at]
        self.free_blocks = cfg.num_blocks
        self.finish: dict[str, float] = {}
        self.steps = 0

    def load(self) -> BackendLoad:
        used = self.cfg.num_blocks - self.free_blocks
        return BackendLoad(len(self.active), len(self.queue), used / self.cfg.num_blocks if self.cfg.num_blocks else 0)

    def add(self, rid: str, prompt_len: int, tokens_left: int, transfer_s: float = 0.0) -> None:
        self.queue.append((rid, prompt_len + 1, tokens_left, transfer_s))

    def _admit(self) -> None:
        while self.queue and len(self.active) < self.cfg.max_num_seqs:
            rid, ctx, left, transfer_s = self.queue[0]
            need = -(-(ctx + left) // self.cfg.block_size)
            if need > self.free_blocks:
                if not self.active and need > self.cfg.num_blocks:  # can never fit: drop it
                    self.queue.pop(0)
                    continue
                break
            self.queue.pop(0)
            self.free_blocks -= need
            self.active.append([rid, ctx, left, need, self.t + transfer_s])  # the pull starts on admission

    def advance_to(self, t: float) -> None:
        """Step until the step in progress at t ends; then self.t (>= t) is when a request arriving at t is taken."""
        while self.t < t and (self.queue or self.active):
            self.step(t)
        self.t = max(self.t, t)

    def drain(self, max_s: float) -> None:
        while (self.queue or self.active) and self.t < max_s:
            self.step(max_s)

    def step(self, until: float) -> None:
        """One decode step of the pulled requests; with none, wait for the next pull to finish (not past until)."""
        self._admit()
        run = [a for a in self.active if a[4] <= self.t]
        if not run:
            nxt = min((a[4] for a in self.active), default=until)
            self.t = max(self.t, min(nxt, until))
            return
        b = len(run)
        ctx = sum(a[1] for a in run)
        self.t += self.cost.predict(b, b, ctx, ctx) * self.jitter(b)
        self.steps += 1
        for a in run:
            a[1] += 1
            a[2] -= 1
            if a[2] <= 0:
                self.finish[a[0]] = self.t
                self.free_blocks += a[3]
        self.active = [a for a in self.active if a[2] > 0]
        self.t += self.gap_s


def _route(policy: RoutingPolicy, sims: Sequence, hashes: list[int]) -> int:
    d = policy.choose(list(range(len(sims))), [s.load() for s in sims], hashes)
    policy.routed(d.backend, hashes)
    return d.backend


def simulate_fleet(requests: list[SimRequest], cost: CostModel, cfg: SimConfig, spec: FleetSpec,
                   slo_ttft_ms: Optional[float] = None, slo_tpot_ms: Optional[float] = None, rate: float = 0.0,
                   max_sim_s: float = 1e6, decode_cost: Optional[CostModel] = None,
                   spread: Optional[StepSpread] = None, decode_spread: Optional[StepSpread] = None,
                   seed: int = 0, parts: Optional[dict[int, dict[str, float]]] = None) -> SimResult:
    """The whole fleet's latencies and goodput (SimResult over all instances). decode_cost: the decode instances'
    step costs when they differ from the others' (`cost`): other hardware, or another speed. spread /
    decode_spread (default: spread): the steps' scatter around the cost models, drawn from `seed`; None: every
    step takes its predicted time. parts: filled with each request's TTFT components (index in `requests` ->
    {"queue_s": send to its first step's start, less ingress_s; "step_s": that step, the prefill (all of it
    without chunking); "after_s": its end to the client's first token})."""
    spec.validate()
    for sp in (spread, decode_spread):
        if sp is not None:
            sp.validate()
    rng = random.Random(seed)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    n_front = spec.prefill_instances or spec.instances
    front = [InstanceSim(cost, cfg, slo_ttft_ms, slo_tpot_ms, _Jitter(spread, rng), spec.step_gap_s)
             for _ in range(n_front)]
    policy = make_policy(spec.router_policy)
    where: dict[int, int] = {}
    lens: dict[int, tuple[int, int]] = {}
    for i in order:
        r = requests[i]
        n_in = min(r.prompt_len, cfg.max_model_len - 1)
        n_out = max(1, min(r.output_len, cfg.max_model_len - n_in))
        lens[i] = (n_in, n_out)
        t_in = r.arrival_s + spec.ingress_s  # when the request reaches an instance's scheduler
        for s in front:
            s.advance_to(t_in)
        ids = _token_ids(i, n_in)
        hashes = prompt_block_hashes(ids[:-1], cfg.block_size) if policy.needs_hashes else []
        k = _route(policy, front, hashes)
        where[i] = k
        front[k].add(f"r{i}", ids, 1 if spec.prefill_instances else n_out, t_in)
    for s in front:
        s.drain(max_sim_s)
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    for i, k in where.items():
        req = front[k].reqs[f"r{i}"]
        if req.first_token_time is not None and req.status not in (RequestStatus.FINISHED_ABORTED,
                                                                     RequestStatus.FINISHED_ERROR):
            first[i] = req.first_token_time
            if f"r{i}" in front[k].finish:
                finish[i] = front[k].finish[f"r{i}"]
    back: list[DecodeSim] = []
    if spec.prefill_instances:
        finish = {}
        dspread = decode_spread if decode_spread is not None else spread
        back = [DecodeSim(decode_cost or cost, cfg, _Jitter(dspread, rng), spec.decode_step_gap_s)
                for _ in range(spec.instances - spec.prefill_instances)]
        dpol = make_policy("least-load" if spec.router_policy == "prefix" else spec.router_policy)
        burst: dict[tuple[int, float], int] = {}  # requests each prefill step finished
        for i in first:
            burst[where[i], first[i]] = burst.get((where[i], first[i]), 0) + 1
        arrive = {i: first[i] + spec.hop_s + spec.hop_s_per_request * (burst[where[i], first[i]] - 1) for i in first}
        for t, i in sorted((arrive[i], i) for i in first):
            for s in back:
                s.advance_to(t)
            n_in, n_out = lens[i]
            d = back[_route(dpol, back, [])]
            first[i] = d.t + spec.return_s  # the decode instance reports the first token when it takes the request
            if n_out <= 1:
                finish[i] = first[i]
                continue
            d.add(f"r{i}", n_in, n_out - 1, spec.transfer_s(-(-n_in // cfg.block_size)))
        for s in back:
            s.drain(max_sim_s)
        for s in back:
            for rid, t in s.finish.items():
                finish[int(rid[1:])] = t + spec.return_s
    if parts is not None:
        for i in first:
            start, end = front[where[i]].first_step[f"r{i}"]
            parts[i] = {"queue_s": start - requests[i].arrival_s - spec.ingress_s, "step_s": end - start,
                        "after_s": first[i] - end}
    res = SimResult(rate=rate, num_requests=len(requests), completed=0, rejected=0, duration_s=0.0,
                    num_steps=sum(s.steps for s in front) + sum(s.steps for s in back),
                    num_preemptions=sum(s.sched.num_preemptions for s in front))
    end = 0.0
    for i in order:
        if i not in finish or i not in first:
            continue
        r = requests[i]
        n_in, n_out = lens[i]
        ttft, e2e = first[i] - r.arrival_s, finish[i] - r.arrival_s
        tpot = (e2e - ttft) / (n_out - 1) if n_out > 1 else None
        t_ttft = r.ttft_ms if r.ttft_ms is not None else slo_ttft_ms
        t_tpot = r.tpot_ms if r.tpot_ms is not None else slo_tpot_ms
        ok = (t_ttft is None or ttft * 1e3 <= t_ttft) and (t_tpot is None or tpot is None or tpot * 1e3 <= t_tpot)
        res.completed += 1
        res.good += ok
        res.ttft_s.append(ttft)
        res.e2e_s.append(e2e)
        if tpot is not None:
            res.tpot_s.append(tpot)
        res.output_tokens += n_out
        res.records.append((n_in, n_out, ttft, tpot, ok))
        end = max(end, finish[i])
    res.rejected = len(requests) - res.completed
    res.duration_s = max(end, 1e-9)
    return res


REPLICATE_FIGURES = ("ttft_p50_ms", "tpot_p50_ms", "output_tok_s")


def fleet_replicates(requests: list[SimRequest], cost: CostModel, cfg: SimConfig, spec: FleetSpec,
                     spread: StepSpread, replicates: int = 30, seed: int = 0, **kw: Any) -> list[SimResult]:
    """simulate_fleet of the same arrivals `replicates` times, each run's step times drawn from `spread` (seeds
    seed, seed + 1, ...); kw: simulate_fleet's other arguments (decode_cost, decode_spread, rate, SLOs)."""
    if replicates < 1:
        raise ConfigError(f"replicates must be at least 1, got {replicates}")
    return [simulate_fleet(requests, cost, cfg, spec, spread=spread, seed=seed + k, **kw) for k in range(replicates)]


def replicate_figures(results: list[SimResult]) -> dict[str, dict[str, float]]:
    """Each figure of REPLICATE_FIGURES over simulated runs: its median (the prediction of one run's figure) and
    its 10th / 90th percentiles across runs (the band one measured run falls within 8 times out of 10)."""
    out: dict[str, dict[str, float]] = {}
    for name in REPLICATE_FIGURES:
        vals = []
        for r in results:
            s = r.summary()
            if name == "output_tok_s":
                vals.append(s["output_throughput"])
            elif s[name.removesuffix("_p50_ms") + "_ms"]:
                vals.append(s[name.removesuffix("_p50_ms") + "_ms"]["p50"])
        vals.sort()
        out[name] = ({"median": statistics.median(vals), "p10": _pct(vals, 10), "p90": _pct(vals, 90)} if vals
                     else {"median": 0.0, "p10": 0.0, "p90": 0.0})
    return out


def max_goodput_rate(make_requests, cost: CostModel, cfg: SimConfig, spec: FleetSpec, slo_ttft_ms: Optional[float],
                     slo_tpot_ms: Optional[float], target: float = 0.9, iters: int = 7) -> float:
    """Highest Poisson rate (req/s, whole fleet) at which >= target of requests meet the SLOs; make_requests(rate)
    gives the arrivals. Bisection in log space."""
    lo, hi = 0.0, None
    rate = float(spec.instances)
    for _ in range(iters + 10):
        res = simulate_fleet(make_requests(rate), cost, cfg, spec, slo_ttft_ms, slo_tpot_ms, rate)
        if res.slo_attainment >= target:
            lo = rate
        else:
            hi = rate
        if hi is None:
            rate *= 2
        elif lo == 0.0:
            rate /= 2
            if rate < 1e-3:
                return 0.0
        else:
            if hi / lo < 1.08:
                break
            rate = math.sqrt(lo * hi)
    return lo


def best_split(make_requests, cost: CostModel, cfg: SimConfig, instances: int, router_policy: str,
               transfer_s_per_block: float, slo_ttft_ms: Optional[float], slo_tpot_ms: Optional[float],
               target: float = 0.9, transfer_s_per_pull: float = 0.0, hop_s: float = 0.0
               ) -> list[tuple[FleetSpec, float]]:
    """(spec, goodput per instance) for colocated and every prefill/decode split, best first."""
    specs = [FleetSpec(instances, p, router_policy, transfer_s_per_block, transfer_s_per_pull, hop_s)
             for p in range(instances)]
    out = [(s, max_goodput_rate(make_requests, cost, cfg, s, slo_ttft_ms, slo_tpot_ms, target) / instances)
           for s in specs]
    return sorted(out, key=lambda x: -x[1])


@dataclass(frozen=True)
class PerTypeRates:
    """DistServe's placement method: the goodput rate of one instance of each kind, measured alone."""

    colocated: float  # one colocated instance, both SLOs
    prefill: float  # one prefill instance, the TTFT SLO (its decode side unconstrained)
    decode: float  # one decode instance, the TPOT SLO (fed by enough prefill instances)

    def per_instance(self, instances: int, prefill_instances: int) -> float:
        """Goodput per instance of a fleet: N x colocated, or min(P x prefill, D x decode) for a split."""
        if not prefill_instances:
            return self.colocated
        return min(prefill_instances * self.prefill, (instances - prefill_instances) * self.decode) / instances


def per_type_rates(make_requests, cost: CostModel, cfg: SimConfig, router_policy: str, transfer_s_per_block: float,
                   slo_ttft_ms: Optional[float], slo_tpot_ms: Optional[float], target: float = 0.9,
                   feeders: int = 4, transfer_s_per_pull: float = 0.0, hop_s: float = 0.0,
                   path: Optional[dict[str, float]] = None) -> PerTypeRates:
    """Each instance kind's goodput rate, simulated alone: cheap enough for large fleets, where simulating every
    split of N instances at N times the rate is not. The TTFT and TPOT targets are met separately (each by
    >= target of requests), so a split's figure can be above what the whole fleet attains on both at once.
    path: FleetSpec's served-path fields (ingress_s, hop_s_per_request, return_s, step_gap_s, decode_step_gap_s)."""
    path = path or {}
    colo = max_goodput_rate(make_requests, cost, cfg, FleetSpec(1, 0, router_policy, **path), slo_ttft_ms,
                            slo_tpot_ms, target)
    pre = max_goodput_rate(make_requests, cost, cfg, FleetSpec(2, 1, router_policy, transfer_s_per_block,
                                                               transfer_s_per_pull, hop_s, **path),
                           slo_ttft_ms, None, target)
    dec = max_goodput_rate(make_requests, cost, cfg, FleetSpec(feeders + 1, feeders, router_policy,
                                                               transfer_s_per_block, transfer_s_per_pull, hop_s,
                                                               **path), None, slo_tpot_ms, target)
    return PerTypeRates(colo, pre, dec)
