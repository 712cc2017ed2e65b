"""User-facing outputs (vLLM names): RequestOutput with one CompletionOutput per sample (n)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tokenmill.core.outputs import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[Logprob]] = None  # one per generated token when asked for
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: Optional[int | str] = None  # the stop string or stop token id that ended it
    # what this update added (for streaming): text, ids and logprobs since the previous update
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: Optional[list[Logprob]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: Optional[list[Optional[Logprob]]] = None
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None  # set when the request failed inside the engine
