"""Fairness across users: virtual token counters (VTC)."""
from __future__ import annotations

from collections import defaultdict

from tokenmill.core.policies.base import Policy
from tokenmill.request import Request


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
