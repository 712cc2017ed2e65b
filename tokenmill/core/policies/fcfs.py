"""First come, first served."""
from __future__ import annotations

from tokenmill.core.policies.base import Policy


class FCFSPolicy(Policy):
    """First come, first served; the newest running request is preempted first."""

    name = "fcfs"
    prefix_aware_admission = True
