"""The policy interface. Each policy orders waiting requests (admission) and running ones (budget order,
preemption victims).

One interface, small classes: `waiting_key` / `order_waiting` (admission order), `order_running` (which running
request takes the step's budget first), `victim_key` (larger is preempted first), `step_token_budget` (the step's
size), `on_arrival` / `on_finish` / `on_scheduled` / `on_output` (accounting), `should_reject` (early rejection,
where `rejects_requests`), `prefix_aware_admission`, `adjust_config`, and `from_config` (construction).
Pure Python, driven by an injectable clock so tests run on simulated time.
"""
from __future__ import annotations

from typing import Any, Optional

from tokenmill.perf.step_models import StepCostModel
from tokenmill.request import Request, RequestStatus


class Policy:
    """The interface the scheduler calls; the defaults are first come, first served with no extras."""

    name = "base"
    # fcfs-style admission may reorder the head of the waiting queue to use cached prefixes first
    # (SchedulerConfig.prefix_aware_window); policies with their own admission order keep it
    prefix_aware_admission = False
    # should_reject is called on the waiting queue each step only where this is true
    rejects_requests = False

    @classmethod
    def from_config(cls, config: Any, cost_model: Optional[StepCostModel] = None) -> "Policy":
        """The policy for a SchedulerConfig-like object (fields policy, slo_reject, slo_ttft_ms, slo_tpot_ms;
        any may be missing). cost_model: a calibrated step-time model, for policies that plan with one."""
        return cls()

    def waiting_key(self, req: Request, now: float) -> tuple:
        # preempted requests go back to the head of the queue: they already waited
        return (req.status != RequestStatus.PREEMPTED, req.arrival_time)

    def victim_key(self, req: Request, now: float) -> tuple:
        return (req.arrival_time,)

    def order_waiting(self, waiting: list[Request], now: float) -> list[Request]:
        """The waiting queue in admission order (default: sorted by waiting_key)."""
        return sorted(waiting, key=lambda r: self.waiting_key(r, now))

    def order_running(self, running: list[Request], now: float) -> list[Request]:
        """The order in which running requests take the step's token budget (default: admission order)."""
        return running

    def defer_prefill(self, req: Request, now: float) -> bool:
        """True: this running, partly prefilled request continues only with the budget left after the
        waiting queue has been admitted."""
        return False

    def on_arrival(self, req: Request) -> None:
        """A request joined the scheduler (add_request)."""

    def on_finish(self, req: Request) -> None:
        """A request left the scheduler (finished, aborted or rejected)."""

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        pass

    def on_output(self, req: Request, num_tokens: int) -> None:
        pass

    def should_reject(self, req: Request, now: float) -> bool:
        return False

    def step_token_budget(self, running: list[Request], budget: int, now: float) -> int:
        """Token budget of the next step (a policy may shrink it to protect running decodes)."""
        return budget

    def adjust_config(self, config: Any) -> Any:
        """The scheduler config this policy runs with (a policy may fill in its own defaults)."""
        return config
