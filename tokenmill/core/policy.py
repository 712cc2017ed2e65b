"""Queue policies. Each orders waiting requests (admission) and running ones (preemption victims).

One interface, small classes: `waiting_key` (smaller is admitted first), `victim_key` (larger is
preempted first), `on_scheduled` (accounting after each step), `should_reject` (early rejection).
Pure Python, driven by an injectable clock so tests run on simulated time.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

from tokenmill.request import Request, RequestStatus


class Policy:
    name = "base"

    def waiting_key(self, req: Request, now: float) -> tuple:
        # preempted requests go back to the head of the queue: they already waited
        return (req.status != RequestStatus.PREEMPTED, req.arrival_time)

    def victim_key(self, req: Request, now: float) -> tuple:
        return (req.arrival_time,)

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        pass

    def on_output(self, req: Request, num_tokens: int) -> None:
        pass

    def should_reject(self, req: Request, now: float) -> bool:
        return False

    def step_token_budget(self, running: list[Request], budget: int, now: float) -> int:
        """Token budget of the next step (a policy may shrink it to protect running decodes)."""
        return budget


class FCFSPolicy(Policy):
    """First come, first served; the newest running request is preempted first."""

    name = "fcfs"


class PriorityPolicy(Policy):
    """Lower `priority` value first (vLLM convention), then arrival; victims: highest value, newest."""

    name = "priority"

    def waiting_key(self, req: Request, now: float) -> tuple:
        return (req.priority, req.status != RequestStatus.PREEMPTED, req.arrival_time)

    def victim_key(self, req: Request, now: float) -> tuple:
        return (req.priority, req.arrival_time)


class SLOPolicy(Policy):
    """Earliest deadline first on time-to-first-token; preempt the request with the most slack.

    A request's first-token deadline is arrival + ttft target (default_ttft_ms when it has none).
    With reject=True, a waiting request whose deadline has already passed by more than its own target
    is rejected (it can no longer meet its SLO and would only delay others).
    """

    name = "slo"

    def __init__(self, default_ttft_ms: float = 10_000.0, default_tpot_ms: float = 1_000.0, reject: bool = False):
        self.default_ttft_ms = default_ttft_ms
        self.default_tpot_ms = default_tpot_ms
        self.reject = reject

    def _ttft_s(self, req: Request) -> float:
        slo = req.sampling_params.slo
        return (slo.ttft_ms if slo and slo.ttft_ms else self.default_ttft_ms) / 1000.0

    def _tpot_s(self, req: Request) -> float:
        slo = req.sampling_params.slo
        return (slo.tpot_ms if slo and slo.tpot_ms else self.default_tpot_ms) / 1000.0

    def deadline(self, req: Request) -> float:
        """When the request's next token is due."""
        if req.first_token_time is None:
            return req.arrival_time + self._ttft_s(req)
        return req.first_token_time + self._tpot_s(req) * req.num_output_tokens

    def waiting_key(self, req: Request, now: float) -> tuple:
        return (self.deadline(req), req.arrival_time)

    def victim_key(self, req: Request, now: float) -> tuple:
        return (self.deadline(req) - now, req.arrival_time)

    def should_reject(self, req: Request, now: float) -> bool:
        return (self.reject and req.first_token_time is None and req.status == RequestStatus.WAITING
                and now - req.arrival_time > 2 * self._ttft_s(req))


class FairPolicy(Policy):
    """Virtual token counter (VTC): the user served least so far goes first.

    Prompt tokens count 1, generated tokens `output_weight`. A user who (re)joins the queue is lifted
    to the smallest counter among users with queued or running work, so idle time earns no credit.
    """

    name = "fair"

    def __init__(self, output_weight: float = 2.0):
        self.output_weight = output_weight
        self.counters: dict[str, float] = defaultdict(float)
        self.active: dict[str, int] = defaultdict(int)

    @staticmethod
    def user(req: Request) -> str:
        return req.sampling_params.user or ""

    def on_arrival(self, req: Request) -> None:
        u = self.user(req)
        if self.active[u] == 0:
            others = [self.counters[v] for v, n in self.active.items() if n > 0 and v != u]
            if others:
                self.counters[u] = max(self.counters[u], min(others))
        self.active[u] += 1

    def on_finish(self, req: Request) -> None:
        u = self.user(req)
        self.active[u] = max(0, self.active[u] - 1)

    def waiting_key(self, req: Request, now: float) -> tuple:
        return (self.counters[self.user(req)], req.arrival_time)

    def victim_key(self, req: Request, now: float) -> tuple:
        return (self.counters[self.user(req)], req.arrival_time)

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        # prefill tokens (not yet part of the output) are charged when scheduled
        prompt_part = max(0, min(num_tokens, req.num_prompt_tokens - req.num_computed_tokens))
        self.counters[self.user(req)] += prompt_part

    def on_output(self, req: Request, num_tokens: int) -> None:
        self.counters[self.user(req)] += self.output_weight * num_tokens


def make_policy(name: str, slo_reject: bool = False, default_ttft_ms: Optional[float] = None,
                default_tpot_ms: Optional[float] = None) -> Policy:
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "slo":
        kw = {}
        if default_ttft_ms:
            kw["default_ttft_ms"] = default_ttft_ms
        if default_tpot_ms:
            kw["default_tpot_ms"] = default_tpot_ms
        return SLOPolicy(reject=slo_reject, **kw)
    if name == "fair":
        return FairPolicy()
    raise ValueError(f"unknown scheduling policy {name!r}; choose fcfs, priority, slo or fair")
