"""Request priority first, then arrival."""
from __future__ import annotations

from tokenmill.core.policies.base import Policy
from tokenmill.request import Request, RequestStatus


class PriorityPolicy(Policy):
    """Lower `priority` value first (vLLM convention), then arrival; victims: highest value, newest."""

    name = "priority"

    def waiting_key(self, req: Request, now: float) -> tuple:
        return (req.priority, req.status != RequestStatus.PREEMPTED, req.arrival_time)

    def victim_key(self, req: Request, now: float) -> tuple:
        return (req.priority, req.arrival_time)
