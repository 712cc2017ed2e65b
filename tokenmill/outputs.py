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


def _cat(a: Optional[list], b: Optional[list]) -> Optional[list]:
    if a is None:
        return None if b is None else list(b)
    return a + list(b or [])


def merge_delta_outputs(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """One DELTA output covering `old` then `new` (a consumer that fell behind gets one item, not a queue
    of them): per sample, text / token ids / logprobs are concatenated; finish state, metrics and error
    come from the newer output."""
    by_index = {o.index: o for o in old.outputs}
    for o in new.outputs:
        prev = by_index.get(o.index)
        if prev is None:
            by_index[o.index] = o
            continue
        by_index[o.index] = CompletionOutput(
            index=o.index, text=prev.text + o.text, token_ids=prev.token_ids + list(o.token_ids),
            logprobs=_cat(prev.logprobs, o.logprobs), cumulative_logprob=o.cumulative_logprob,
            finish_reason=o.finish_reason or prev.finish_reason, stop_reason=o.stop_reason or prev.stop_reason,
            delta_text=prev.delta_text + o.delta_text, delta_token_ids=prev.delta_token_ids + list(o.delta_token_ids),
            delta_logprobs=_cat(prev.delta_logprobs, o.delta_logprobs))
    return RequestOutput(new.request_id, new.prompt, new.prompt_token_ids or old.prompt_token_ids,
                         [by_index[i] for i in sorted(by_index)], finished=new.finished,
                         prompt_logprobs=_cat(old.prompt_logprobs, new.prompt_logprobs),
                         metrics=new.metrics or old.metrics, error=new.error or old.error)
