"""Queue policies behind one interface (base.Policy): fcfs, priority, slo (deadlines / step budgets), fair (VTC).

One file per policy; each class names itself (`name`, what SchedulerConfig.policy selects) and builds itself
from a config (`from_config`). Step-time estimators live in tokenmill.perf.step_models.
"""
from __future__ import annotations

from typing import Any, Optional

from tokenmill.config import SchedulerConfig
from tokenmill.core.policies.base import Policy
from tokenmill.core.policies.fair import FairPolicy
from tokenmill.core.policies.fcfs import FCFSPolicy
from tokenmill.core.policies.priority import PriorityPolicy
from tokenmill.core.policies.slo import SLOPolicy
from tokenmill.perf.step_models import StepCostModel

POLICY_CLASSES: tuple[type[Policy], ...] = (FCFSPolicy, PriorityPolicy, SLOPolicy, FairPolicy)

__all__ = ["POLICY_CLASSES", "FCFSPolicy", "FairPolicy", "Policy", "PriorityPolicy", "SLOPolicy",
           "make_policy", "make_policy_for_config", "policy_class"]


def policy_class(name: str) -> type[Policy]:
    for cls in POLICY_CLASSES:
        if cls.name == name:
            return cls
    raise ValueError(f"unknown scheduling policy {name!r}; choose "
                     f"{', '.join(c.name for c in POLICY_CLASSES[:-1])} or {POLICY_CLASSES[-1].name}")


def make_policy_for_config(config: Any, cost_model: Optional[StepCostModel] = None) -> Policy:
    """The policy a SchedulerConfig names; server-wide SLO targets come from its `slo_ttft_ms` /
    `slo_tpot_ms` fields (None: the policy's defaults)."""
    return policy_class(config.policy).from_config(config, cost_model)


def make_policy(name: str, slo_reject: bool = False, default_ttft_ms: Optional[float] = None,
                default_tpot_ms: Optional[float] = None, cost_model: Optional[StepCostModel] = None) -> Policy:
    """The policy `name` with the given server-wide settings (as make_policy_for_config takes them from a config)."""
    return make_policy_for_config(SchedulerConfig(policy=name, slo_reject=slo_reject, slo_ttft_ms=default_ttft_ms,
                                                  slo_tpot_ms=default_tpot_ms), cost_model)
