"""Turns EngineCoreOutputs (token ids) into RequestOutputs (text, deltas, logprobs); fans out n > 1.

Stop strings are matched here, on detokenized text; a match finishes the request, and the engine
aborts its engine-side request so its KV blocks are freed at once.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

from tokenmill.core.outputs import EngineCoreOutput, Logprob
from tokenmill.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _Child:
    engine_id: str
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    stops: StopChecker
    out: CompletionOutput
    cum_logprob: float = 0.0


@dataclass
class _Parent:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    children: list[_Child]
    metrics: RequestMetrics
    kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    new_prompt_logprobs: Optional[list[Optional[Logprob]]] = None  # since the last DELTA output
    prompt_logprobs: Optional[list[Optional[Logprob]]] = None
    num_finished: int = 0
    error: Optional[str] = None
    updated: set[int] = field(default_factory=set)


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample i of n: its own seed (seed + i) so the n samples differ but stay reproducible."""
    if params.n == 1 and index == 0:
        return params
    seed = None if params.seed is None else params.seed + index
    return params.clone(n=1, seed=seed)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, tuple[_Parent, _Child]] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[tuple[str, SamplingParams]]:
        """Register a request; returns (engine request id, params) for each of its n samples."""
        if request_id in self.parents:
            raise ValueError(f"duplicate request id {request_id!r}")
        children = []
        for i in range(params.n):
            p = child_params(params, i)
            eid = child_request_id(request_id, i, params.n)
            children.append(_Child(
                eid, i, p, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, p.skip_special_tokens),
                StopChecker(p.stop, p.include_stop_str_in_output),
                CompletionOutput(index=i, logprobs=[] if p.logprobs is not None else None,
                                 cumulative_logprob=0.0 if p.logprobs is not None else None)))
        parent = _Parent(request_id, prompt, list(prompt_token_ids), children, RequestMetrics(arrival_time),
                         kind=params.output_kind)
        self.parents[request_id] = parent
        for c in children:
            self.child_to_parent[c.engine_id] = (parent, c)
        return [(c.engine_id, c.params) for c in children]

    def engine_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [c.engine_id for c in parent.children if not c.out.finished] if parent else []

    def has(self, request_id: str) -> bool:
        return request_id in self.parents

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs. Returns (updated RequestOutputs, engine ids stopped by a stop string)."""
        now = time.monotonic()
        touched: dict[str, _Parent] = {}
        to_abort: list[str] = []
        for o in outputs:
            entry = self.child_to_parent.get(o.req_id)
            if entry is None:
                continue
            parent, child = entry
            touched[parent.request_id] = parent
            parent.updated.add(child.index)
            if o.prompt_logprobs and child.index == 0:  # the n samples share one prompt
                parent.prompt_logprobs = (parent.prompt_logprobs or []) + list(o.prompt_logprobs)
                parent.new_prompt_logprobs = (parent.new_prompt_logprobs or []) + list(o.prompt_logprobs)
            m = parent.metrics
            if o.first_scheduled_time is not None and m.first_scheduled_time is None:
                m.first_scheduled_time = o.first_scheduled_time
                m.num_cached_tokens = max(m.num_cached_tokens, o.num_cached_tokens)
            if o.new_token_ids and m.first_token_time is None:
                m.first_token_time = now
            if self._apply(child, o) and o.finish_reason is None:
                to_abort.append(child.engine_id)
            if o.error:
                parent.error = o.error
            if child.out.finished:
                parent.num_finished += 1
                del self.child_to_parent[child.engine_id]
        results = []
        for parent in touched.values():
            done = parent.num_finished == len(parent.children)
            if done:
                parent.metrics.finished_time = now
                del self.parents[parent.request_id]
            if parent.kind != RequestOutputKind.FINAL_ONLY or done:
                results.append(self._snapshot(parent, done))
        return results, to_abort

    def _apply(self, child: _Child, o: EngineCoreOutput) -> bool:
        """Append tokens to one sample; True when a stop string ended it."""
        out = child.out
        toks = o.new_token_ids
        # a token-based stop (EOS / stop_token_ids) ends the text before that token
        text_toks = toks[:-1] if (o.finish_reason == "stop" and toks) else toks
        delta = child.detok.update(text_toks) if text_toks else ""
        if o.finish_reason is not None:
            delta += child.detok.flush()
        emitted, stopped = child.stops.process(delta)
        if not stopped and o.finish_reason is not None:
            emitted += child.stops.flush()
        out.token_ids.extend(toks)
        out.delta_token_ids = list(toks)
        out.delta_text = emitted
        out.text += emitted
        if o.new_logprobs is not None and out.logprobs is not None:
            out.logprobs.extend(o.new_logprobs)
            out.delta_logprobs = list(o.new_logprobs)
            child.cum_logprob += sum(lp.logprob for lp in o.new_logprobs if math.isfinite(lp.logprob))
            out.cumulative_logprob = child.cum_logprob
        if stopped:
            out.finish_reason = "stop"
            out.stop_reason = child.stops.matched_stop
            return True
        if o.finish_reason is not None:
            out.finish_reason = o.finish_reason
            out.stop_reason = o.stop_reason
        return False

    def _snapshot(self, parent: _Parent, done: bool) -> RequestOutput:
        if parent.kind == RequestOutputKind.DELTA:
            return self._delta(parent, done)
        outs = []
        for c in parent.children:
            o = c.out
            fresh = c.index in parent.updated
            outs.append(CompletionOutput(
                index=o.index, text=o.text, token_ids=list(o.token_ids),
                logprobs=list(o.logprobs) if o.logprobs is not None else None,
                cumulative_logprob=o.cumulative_logprob, finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                delta_text=o.delta_text if fresh else "", delta_token_ids=o.delta_token_ids if fresh else [],
                delta_logprobs=o.delta_logprobs if fresh else None))
            o.delta_text, o.delta_token_ids, o.delta_logprobs = "", [], None
        parent.updated.clear()
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished=done,
                             prompt_logprobs=parent.prompt_logprobs, metrics=parent.metrics, error=parent.error)

    def _delta(self, parent: _Parent, done: bool) -> RequestOutput:
        """Only what changed since the previous output (no copy of what was sent before)."""
        outs = []
        for c in parent.children:
            if c.index not in parent.updated:
                continue
            o = c.out
            outs.append(CompletionOutput(
                index=o.index, text=o.delta_text, token_ids=o.delta_token_ids,
                logprobs=(o.delta_logprobs or []) if o.logprobs is not None else None,
                cumulative_logprob=o.cumulative_logprob, finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                delta_text=o.delta_text, delta_token_ids=o.delta_token_ids, delta_logprobs=o.delta_logprobs))
            o.delta_text, o.delta_token_ids, o.delta_logprobs = "", [], None
        parent.updated.clear()
        plps, parent.new_prompt_logprobs = parent.new_prompt_logprobs, None
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished=done,
                             prompt_logprobs=plps, metrics=parent.metrics, error=parent.error)

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its unfinished engine ids (to abort in the engine)."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        ids = []
        for c in parent.children:
            self.child_to_parent.pop(c.engine_id, None)
            if not c.out.finished:
                ids.append(c.engine_id)
        return ids
