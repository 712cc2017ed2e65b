"""Service-level objectives: earliest first-token deadline first, step budgets sized for the running decodes'
time-per-output-token targets. Step times come from tokenmill.perf.step_models (pure Python)."""
from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Optional

from tokenmill.core.policies.base import Policy
from tokenmill.perf.step_models import CorrectedStepModel, OnlineStepModel, StepCostModel
from tokenmill.request import Request, RequestStatus


def _is_decode(r: Request) -> bool:
    """A running request past its prompt: one known token (plus any drafts) to compute this step."""
    return r.num_tokens - r.num_computed_tokens <= 1 and r.first_token_time is not None


class SLOPolicy(Policy):
    """Earliest deadline first on time-to-first-token; preempt the request with the most slack;
    size each step's token budget so running decodes keep their time-per-output-token target.

    A request's first-token deadline is arrival + ttft target (default_ttft_ms when it has none).
    With late_last=True (default), waiting requests whose deadline has passed queue behind those that
    can still make theirs (plain EDF collapses under overload: everyone ends up late).
    With reject=True, a waiting request whose deadline has already passed by more than its own target
    is rejected (it can no longer meet its SLO and would only delay others).
    Step budget: the largest budget whose predicted step time (cost_model, or a model learned online
    from observed step times) fits the tightest decode's remaining slack (at least its TPOT target).
    TPOT is a request's average over its output, so a decode's slack also counts a share (`amortize`) of
    what its remaining tokens (up to `amortize_tokens` of them, bounded by max_tokens) will save if the
    steps after this one take the decode-only step time: a long prefill step early in a request is paid
    back by its later, shorter steps. Where per-step costs are high (the CPU), fewer, larger prefill
    steps then serve more requests within target than many small ones. The window is short (8 tokens) because it
    slides: every step counts the same future savings again, so a long window let one request absorb a run of long
    steps that only its last tokens could pay back (on a fast CPU, with steps 1.3x their prediction, long-prefill
    requests missed their TPOT at 32).
    A prompt that needs a larger chunk to make its first-token deadline may get one as long as every
    running decode could still meet `stretch_margin` of its real target (no planning margin) afterwards;
    past that point the prompt waits rather than cost the decodes their targets.
    Within a step, running decodes take the budget first (it was sized for them), then prompts by deadline.
    """

    name = "slo"

    @classmethod
    def from_config(cls, config: Any, cost_model: Optional[StepCostModel] = None) -> "SLOPolicy":
        """Server-wide targets from `slo_ttft_ms` / `slo_tpot_ms` (None: the defaults), rejection from `slo_reject`."""
        kw: dict[str, Any] = {}
        if getattr(config, "slo_ttft_ms", None):
            kw["default_ttft_ms"] = config.slo_ttft_ms
        if getattr(config, "slo_tpot_ms", None):
            kw["default_tpot_ms"] = config.slo_tpot_ms
        return cls(reject=bool(getattr(config, "slo_reject", False)), cost_model=cost_model, **kw)

    def __init__(self, default_ttft_ms: float = 10_000.0, default_tpot_ms: float = 1_000.0, reject: bool = False,
                 cost_model: Optional[StepCostModel] = None, min_prefill_chunk: int = 32,
                 long_prefill_fraction: float = 0.25, late_last: bool = True, stretch_margin: float = 0.95,
                 tpot_margin: float = 0.8, amortize: float = 1.0, amortize_tokens: int = 8):
        self.default_ttft_ms = default_ttft_ms
        # plan decodes at this fraction of their TPOT target: step times vary, and a request whose
        # average lands exactly on the target misses it half the time
        self.tpot_margin = tpot_margin
        self.late_last = late_last
        # a first-token deadline may stretch a step as far as every running decode can absorb and still
        # meet this fraction of its real TPOT target (no planning margin)
        self.stretch_margin = stretch_margin
        self.amortize = amortize
        self.amortize_tokens = amortize_tokens
        self.default_tpot_ms = default_tpot_ms
        self.reject = reject
        self.cost_model = cost_model
        self.online = OnlineStepModel() if cost_model is None else None
        self.corrected = CorrectedStepModel(cost_model) if cost_model is not None else None
        self.min_prefill_chunk = min_prefill_chunk
        self.long_prefill_fraction = long_prefill_fraction
        self._last_now: Optional[float] = None
        self._waiting_seen: list[Request] = []  # head of the waiting queue at its last ordering
        self._last_tokens = 0
        self._last_kv = 0
        self._last_reqs = 0
        self._last_pairs = 0
        # prefill tokens the running decodes' TPOT plan left the last step (what admission prices prompts at)
        self._last_prefill_chunk = 512
        self._last_num_decodes = 0
        self._running_prompts: list[Request] = []  # running, partly prefilled, as of the last step_token_budget
        # running prompts moved out of the on-time set: they yield the budget (set by order_waiting for the next step)
        self._deferred: set[str] = set()
        self._next_deferred: set[str] = set()

    def _ttft_s(self, req: Request) -> float:
        slo = req.sampling_params.slo
        return (slo.ttft_ms if slo and slo.ttft_ms else self.default_ttft_ms) / 1000.0

    def _tpot_target_s(self, req: Request) -> float:
        """The request's time-per-output-token target."""
        slo = req.sampling_params.slo
        return (slo.tpot_ms if slo and slo.tpot_ms else self.default_tpot_ms) / 1000.0

    def _tpot_s(self, req: Request) -> float:
        """The request's time-per-output-token target, less the safety margin the policy plans with."""
        return self._tpot_target_s(req) * self.tpot_margin

    def deadline(self, req: Request) -> float:
        """When the request's next token is due."""
        if req.first_token_time is None:
            return req.arrival_time + self._ttft_s(req)
        return req.first_token_time + self._tpot_s(req) * req.num_output_tokens

    def waiting_key(self, req: Request, now: float) -> tuple:
        d = self.deadline(req)
        late = self.late_last and req.first_token_time is None and d < now
        return (late, d, req.arrival_time)

    def order_waiting(self, waiting: list[Request], now: float) -> list[Request]:
        """Earliest deadline first, trimmed so as many prompts as possible make their first-token
        deadline (Moore-Hodgson): walking the unfinished prompts (the running, partly prefilled ones and the
        waiting ones) in deadline order with each one's predicted prefill time, whenever the running total
        misses a deadline the longest prompt so far is moved out of the on-time set. Order: requests that
        already produced tokens (preempted), the on-time set by deadline, then the rest (those moved out,
        then the already late) by deadline. A running prompt moved out yields the budget from the next step
        on (defer_prefill): a long prompt admitted a moment before a burst of short ones no longer makes
        them all miss."""
        resumed = sorted((r for r in waiting if r.first_token_time is not None), key=lambda r: self.deadline(r))
        fresh = sorted((r for r in waiting if r.first_token_time is None), key=lambda r: (self.deadline(r), r.arrival_time))
        if not self.late_last:
            self._waiting_seen = fresh[:64]
            return resumed + fresh
        per_tok = self._prefill_seconds_per_token()
        prompts = sorted([r for r in self._running_prompts if self.deadline(r) >= now] + fresh,
                         key=lambda r: (self.deadline(r), r.arrival_time))
        t = now
        heap: list[tuple[float, int]] = []
        on_time: set[int] = set()
        for k, r in enumerate(prompts):
            d = self.deadline(r)
            if d < now:
                continue
            p = (r.num_tokens - r.num_computed_tokens) * per_tok
            heapq.heappush(heap, (-p, k))
            on_time.add(k)
            t += p
            if t > d:
                neg_p, drop = heapq.heappop(heap)
                on_time.discard(drop)
                t += neg_p
        moved_out = {id(r) for k, r in enumerate(prompts) if k not in on_time}
        self._next_deferred = {r.request_id for r in self._running_prompts if id(r) in moved_out}
        kept = [r for r in fresh if id(r) not in moved_out and self.deadline(r) >= now]
        moved = [r for r in fresh if id(r) in moved_out and self.deadline(r) >= now]
        out_late = [r for r in fresh if self.deadline(r) < now]
        self._waiting_seen = kept[:64]
        return resumed + kept + moved + out_late

    def order_running(self, running: list[Request], now: float) -> list[Request]:
        """Decodes first (the budget was sized for them: a prompt admitted earlier must not take their share),
        then prompts by first-token deadline, the shortest first among equal deadlines, the late ones last."""
        def key(r: Request) -> tuple:
            if _is_decode(r):
                return (0, 0.0, 0)
            d = self.deadline(r)
            return (1 if d >= now and r.request_id not in self._deferred else 2, d, r.num_tokens - r.num_computed_tokens)

        return sorted(running, key=key)

    def defer_prefill(self, req: Request, now: float) -> bool:
        """A prompt already past its first-token deadline yields the budget to prompts that can still
        make theirs (it has missed its target; finishing it first would make others miss too)."""
        return self.late_last and req.first_token_time is None and (self.deadline(req) < now
                                                                    or req.request_id in self._deferred)

    def _prefill_seconds_per_token(self) -> float:
        """Predicted seconds per prompt token at the chunk the running decodes' TPOT plan left the last step
        (the whole budget when nothing decodes), the step's decodes included: the rate prompts really get.
        A deadline may stretch a step further, but only while the decodes can absorb it; priced at that largest
        chunk, admission kept long prompts first that then made the short ones behind them miss (simulated
        long-prefill runs at 0.4-0.8 req/s)."""
        p = max(self.min_prefill_chunk, self._last_prefill_chunk)
        model = self.step_model()
        return max(1e-6, (model.predict(p + self._last_num_decodes, 1 + self._last_num_decodes, p, p * (p + 1) // 2)) / p)

    def victim_key(self, req: Request, now: float) -> tuple:
        return (self.deadline(req) - now, req.arrival_time)

    @property
    def rejects_requests(self) -> bool:  # type: ignore[override]
        return self.reject

    def should_reject(self, req: Request, now: float) -> bool:
        return (self.reject and req.first_token_time is None and req.status == RequestStatus.WAITING
                and now - req.arrival_time > 2 * self._ttft_s(req))

    def adjust_config(self, config: Any) -> Any:
        """Cap concurrent long prefills by default: one prompt over a quarter of the step budget at a time."""
        if getattr(config, "long_prefill_token_threshold", None) == 0 and dataclasses.is_dataclass(config):
            threshold = max(self.min_prefill_chunk, int(config.max_num_batched_tokens * self.long_prefill_fraction))
            return dataclasses.replace(config, long_prefill_token_threshold=threshold, max_long_partial_prefills=1)
        return config

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        self._last_tokens += num_tokens
        self._last_kv += req.num_computed_tokens + num_tokens
        self._last_reqs += 1
        self._last_pairs += num_tokens * req.num_computed_tokens + num_tokens * (num_tokens + 1) // 2

    def step_model(self) -> StepCostModel:
        """The step-time model the policy plans with (calibrated and corrected online, or learned online)."""
        return self.corrected if self.corrected is not None else self.online  # type: ignore[return-value]

    def step_token_budget(self, running: list[Request], budget: int, now: float) -> int:
        if self._last_now is not None and self._last_tokens:  # the wall time of the step just run
            if self.online is not None:
                self.online.observe(self._last_tokens, self._last_kv, now - self._last_now)
            else:
                self.corrected.observe(self._last_tokens, self._last_reqs, self._last_kv, self._last_pairs,
                                       now - self._last_now)
        self._last_now, self._last_tokens, self._last_kv, self._last_reqs, self._last_pairs = now, 0, 0, 0, 0
        decodes = [r for r in running if _is_decode(r)]
        n_dec = sum(1 + len(r.spec_token_ids) for r in decodes)
        self._last_num_decodes = n_dec
        self._running_prompts = [r for r in running
                                 if r.first_token_time is None and r.num_tokens - r.num_computed_tokens > 1]
        self._deferred, self._next_deferred = self._next_deferred, set()
        self._last_prefill_chunk = budget  # lowered by _step_budget when decodes limit the step
        return self._step_budget(running, decodes, n_dec, budget, now) if decodes else budget

    def _step_budget(self, running: list[Request], decodes: list[Request], n_dec: int, budget: int,
                     now: float) -> int:
        dec_kv = sum(r.num_tokens for r in decodes)
        # context of a running partial prefill the chunk would continue (else a new prompt from 0)
        ctx = max((r.num_computed_tokens for r in running if r.num_tokens - r.num_computed_tokens > 1), default=0)
        model = self.step_model()

        def step_time(p: int) -> float:
            kv = dec_kv + (ctx + p if p else 0)
            pairs = dec_kv + p * (ctx + (p + 1) // 2)
            return model.predict(n_dec + p, len(decodes) + (1 if p else 0), kv, pairs)

        decode_step = step_time(0)

        def allowance(r: Request, target: float, amortize: float) -> float:
            # the longest step after which r's next token is still on time at `target` per token, counting
            # (a share `amortize` of) what its next tokens save if their steps take the decode-only time
            slack = r.first_token_time + target * r.num_output_tokens - now
            ahead = min(self.amortize_tokens, r.max_tokens - r.num_output_tokens) - 1
            if amortize > 0 and ahead > 0:
                slack += amortize * ahead * max(0.0, target - decode_step)
            return slack

        # what the decodes plan with (never below their margined target: a late decode keeps its pace) ...
        allowed = min(max(self._tpot_s(r), allowance(r, self._tpot_s(r), self.amortize)) for r in decodes)
        # ... and the most they can absorb for a prompt's first-token deadline and still meet their targets
        stretch_to = min(allowance(r, self._tpot_target_s(r) * self.stretch_margin, 1.0) for r in decodes)

        hi = max(0, budget - n_dec)
        lo = min(self.min_prefill_chunk, hi)
        if hi <= lo or step_time(hi) <= allowed:
            return budget
        if step_time(lo) > allowed:
            # the smallest chunk overruns the plan: give it only if the decodes can absorb it, else admit no
            # prefill until some decodes finish (bounds concurrency; a forced small chunk at a long context cost
            # the decodes their targets and still left the prompt late)
            p = 0 if (step_time(0) > allowed or step_time(lo) > stretch_to) else lo
        else:
            while hi - lo > 1:  # largest prefill p with step_time(p) <= allowed
                mid = (lo + hi) // 2
                if step_time(mid) <= allowed:
                    lo = mid
                else:
                    hi = mid
            p = lo
        self._last_prefill_chunk = p
        # a first-token deadline may stretch the step, as far as the decodes can absorb (stretch_to)
        cap = p
        hi = max(0, budget - n_dec)
        while cap < hi and step_time(min(hi, cap * 2 + 1)) <= stretch_to:
            cap = min(hi, cap * 2 + 1)
        return min(budget, n_dec + max(p, min(cap, self._ttft_chunk(hi, p, now, step_time))))

    def _ttft_chunk(self, max_p: int, p_tpot: int, now: float, step_time) -> int:
        """Smallest prefill chunk that lets the earliest-deadline prompts (running partial prefills, then
        the waiting queue as last seen) still meet their first-token deadlines; 0 when none needs more
        than p_tpot or they cannot make it anyway (then the decodes keep their target)."""
        pending = sorted([(self.deadline(r), r.num_tokens - r.num_computed_tokens) for r in self._running_prompts
                          if r.request_id not in self._deferred]
                         + [(self.deadline(r), r.num_tokens - r.num_computed_tokens) for r in self._waiting_seen
                            if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)],  # not admitted since
                         key=lambda x: x[0])
        need, total = 0, 0
        for deadline, remaining in pending[:8]:
            total += remaining
            slack = deadline - now
            if slack <= 0:
                continue

            def in_time(q: int) -> bool:
                q = min(q, total)
                return -(-total // q) * step_time(q) <= slack

            if max_p <= 0 or not in_time(min(max_p, total)):
                continue  # hopeless: do not hurt the decodes for it
            if p_tpot > 0 and in_time(p_tpot):
                continue
            lo, hi = max(1, p_tpot), max_p
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if in_time(mid):
                    hi = mid
                else:
                    lo = mid
            need = max(need, hi)
        return need
