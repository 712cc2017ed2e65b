"""What crosses between the API side and the engine for fine-tuning: a job's spec (in) and its updates (out),
plain picklable dataclasses; and the hyperparameter rules shared by the HTTP route and the CLI."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from tokenmill.errors import InvalidRequestError
from tokenmill.finetune.data import TokenizedExample
from tokenmill.finetune.lora import TARGET_MODULES
from tokenmill.finetune.trainer import Hyperparameters

MAX_LORA_RANK = 256
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class JobSpec:
    job_id: str
    examples: list[TokenizedExample]
    hp: Hyperparameters
    out_dir: str  # the PEFT folder written when the job succeeds
    base_model: str  # recorded in adapter_config.json
    fine_tuned_model: str  # the adapter's served name, ft:<base>:<suffix>


@dataclass
class JobEvent:
    message: str
    level: str = "info"
    data: Optional[dict[str, Any]] = None
    type: str = "message"  # "metrics" for a training step's loss
    created_at: int = field(default_factory=lambda: int(time.time()))


@dataclass
class JobUpdate:
    """A change of one job seen by the engine: its status now, events since the last update, counters."""

    job_id: str
    status: str  # queued, running, succeeded, failed, cancelled
    events: list[JobEvent] = field(default_factory=list)
    trained_tokens: int = 0
    steps: int = 0
    total_steps: int = 0
    finished_at: Optional[int] = None
    error: Optional[dict[str, Any]] = None  # {"message", "code", "param"}
    result_dir: Optional[str] = None


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be an integer in [{lo}, {hi}] or \"auto\"", param=name)
    return value


def resolve_hyperparameters(hyper: Optional[dict[str, Any]], extras: Optional[dict[str, Any]], num_examples: int,
                            seed: Optional[int]) -> Hyperparameters:
    """The API's hyperparameters ("auto" or a value) and LoRA extras -> Hyperparameters; bad values raise
    InvalidRequestError naming the parameter. auto: 3 epochs, batch size 1 per 10 examples (1 to 8),
    learning-rate multiplier 1 (x 2e-4)."""
    hyper = dict(hyper or {})
    unknown = set(hyper) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
    if unknown:
        raise InvalidRequestError(f"unknown hyperparameter(s) {sorted(unknown)}",
                                  param=f"hyperparameters.{sorted(unknown)[0]}")
    n_epochs = hyper.get("n_epochs", "auto")
    n_epochs = 3 if n_epochs == "auto" else _int(n_epochs, "hyperparameters.n_epochs", 1, 100)
    bs = hyper.get("batch_size", "auto")
    bs = max(1, min(8, num_examples // 10)) if bs == "auto" else _int(bs, "hyperparameters.batch_size", 1, 256)
    lr = hyper.get("learning_rate_multiplier", "auto")
    if lr == "auto":
        lr = 1.0
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1000:
        raise InvalidRequestError("hyperparameters.learning_rate_multiplier must be a number in (0, 1000] or "
                                  "\"auto\"", param="hyperparameters.learning_rate_multiplier")
    extras = dict(extras or {})
    unknown = set(extras) - {"lora_rank", "lora_alpha", "target_modules"}
    if unknown:
        raise InvalidRequestError(f"unknown fine-tuning extra(s) {sorted(unknown)} (lora_rank, lora_alpha, "
                                  "target_modules)", param=sorted(unknown)[0])
    rank = _int(extras.get("lora_rank", 8), "lora_rank", 1, MAX_LORA_RANK)
    alpha = extras.get("lora_alpha", 2 * rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise InvalidRequestError("lora_alpha must be a positive number", param="lora_alpha")
    targets = extras.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    if targets == "all":
        targets = list(TARGET_MODULES)
    if not isinstance(targets, list) or not targets or any(t not in TARGET_MODULES for t in targets) \
            or len(set(targets)) != len(targets):
        raise InvalidRequestError(f"target_modules must be \"all\" or a list of distinct names from "
                                  f"{', '.join(TARGET_MODULES)}", param="target_modules")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequestError("seed must be an integer", param="seed")
    return Hyperparameters(n_epochs=n_epochs, batch_size=bs, learning_rate_multiplier=float(lr), lora_rank=rank,
                           lora_alpha=float(alpha), target_modules=tuple(targets), seed=0 if seed is None else seed)


def check_suffix(suffix: Optional[str]) -> Optional[str]:
    if suffix is None:
        return None
    ok = isinstance(suffix, str) and 1 <= len(suffix) <= 64 and all(c.isalnum() or c in "-_." for c in suffix)
    if not ok:
        raise InvalidRequestError("suffix must be 1 to 64 letters, digits, '-', '_' or '.'", param="suffix")
    return suffix
