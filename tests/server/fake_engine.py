"""A small in-process EngineClient for fast tests of the HTTP layer (byte-level tokenizer, fake sampler).

It follows the EngineClient contract (outputs as params.output_kind asks, abort on cancel, errors before
the first yield) so the server code paths are exercised; the real-engine tests live in test_openai_live.py.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from typing import AsyncIterator, Optional

from tokenmill.core.outputs import Logprob
from tokenmill.engine.protocol import EngineStats
from tokenmill.errors import EngineOverloadedError, InvalidRequestError, PromptTooLongError
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

IM_START, IM_END = 256, 257


class ByteTokenizer:
    """Token i < 256 is byte i; 256/257 are <|im_start|>/<|im_end|>."""

    eos_token_id = IM_END

    def __len__(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        parts, buf = [], bytearray()
        for t in ids:
            if t < 256:
                buf.append(t)
                continue
            parts.append(buf.decode(errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                parts.append("<|im_start|>" if t == IM_START else "<|im_end|>")
        parts.append(buf.decode(errors="replace"))
        return "".join(parts)


class FakeProcessor:
    def __init__(self, tokenizer: ByteTokenizer, max_model_len: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: Optional[list] = None) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [IM_START] + self.tokenizer.encode(f"{m['role']}\n{m.get('content', '')}") + [IM_END]
        if add_generation_prompt:
            ids += [IM_START] + self.tokenizer.encode("assistant\n")
        return ids

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < 258 for t in prompt_ids):
            raise InvalidRequestError("prompt token id out of range", param="prompt")
        params.validate_vocab(258)
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(prompt_ids)} tokens, the limit is {self.max_model_len - 1}")
        room = self.max_model_len - len(prompt_ids)
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise PromptTooLongError(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds "
                                     f"max_model_len ({self.max_model_len})")
        return params.max_tokens


class FakeEngine:
    """Generates lowercase letters and spaces (seeded), one token per `step_s` per request."""

    def __init__(self, max_model_len: int = 512, step_s: float = 0.002, max_waiting: Optional[int] = None):
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.processor = FakeProcessor(self.tokenizer, max_model_len)
        self.step_s = step_s
        self.max_waiting = max_waiting
        self.blocks: dict[str, int] = {}  # request id -> KV blocks held
        self.fail_ids: set[str] = set()  # request ids (prefix match) that fail inside a step
        self.stuck = False
        self.alive = True
        self.aborted: list[str] = []
        self.stats = EngineStats(kv_blocks_total=1000, last_step_time=time.monotonic())
        self._rng_counter = 0

    @property
    def is_alive(self) -> bool:
        return self.alive

    def get_stats(self) -> EngineStats:
        s = self.stats
        s.num_running = len(self.blocks)
        s.kv_blocks_used = sum(self.blocks.values())
        return s

    async def abort(self, request_id: str) -> None:
        if self.blocks.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        self.alive = False

    def _sample(self, rng: random.Random, params: SamplingParams) -> int:
        if params.greedy:
            return ord("a")
        return ord(rng.choice("abcdefgh ")) if rng.random() > 0.02 else IM_END

    async def generate(self, prompt: Optional[str], params: SamplingParams, request_id: str,
                       prompt_token_ids: Optional[list[int]] = None,
                       arrival_time: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        ids = list(prompt_token_ids if prompt_token_ids is not None else self.tokenizer.encode(prompt or ""))
        if self.max_waiting is not None and len(self.blocks) >= self.max_waiting:
            raise EngineOverloadedError("too many requests waiting")
        if any(t >= 258 for t in ids):
            raise InvalidRequestError("token id out of range", param="prompt")
        max_tokens = self.processor.validate(ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        metrics = RequestMetrics(arrival_time=arrival)
        self._rng_counter += 1
        rngs = [random.Random((params.seed if params.seed is not None else self._rng_counter) * 131 + i)
                for i in range(params.n)]
        outs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                for i in range(params.n)]
        self.blocks[request_id] = math.ceil(len(ids) / 16) * params.n
        sent_plps = False
        try:
            while True:
                while self.stuck:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(self.step_s)
                if request_id not in self.blocks:  # aborted: like the AsyncEngine, a final "abort" marker
                    yield RequestOutput(request_id, None, [], [CompletionOutput(index=0, finish_reason="abort")],
                                        finished=True)
                    return
                self.stats.steps += 1
                self.stats.last_step_time = time.monotonic()
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = time.monotonic()
                if any(request_id.startswith(f) for f in self.fail_ids):
                    self.blocks.pop(request_id, None)
                    for o in outs:
                        o.finish_reason = "error"
                    yield _as_kind(RequestOutput(request_id, prompt, ids, outs, True, error="injected step failure"),
                                   params.output_kind)
                    return
                for i, o in enumerate(outs):
                    o.delta_text, o.delta_token_ids, o.delta_logprobs = "", [], None
                    if o.finished:
                        continue
                    tok = self._sample(rngs[i], params)
                    if params.ignore_eos and tok == IM_END:
                        tok = ord("z")
                    if params.min_tokens and len(o.token_ids) < params.min_tokens and tok == IM_END:
                        tok = ord("y")
                    o.token_ids.append(tok)
                    o.delta_token_ids = [tok]
                    if o.logprobs is not None:
                        lp = Logprob(tok, -0.5, 1, [(tok, -0.5), (ord("q"), -1.5)][: max(params.logprobs or 0, 0)])
                        o.logprobs.append(lp)
                        o.delta_logprobs = [lp]
                    self.stats.generation_tokens += 1
                    if tok == IM_END:
                        o.finish_reason, o.stop_reason = "stop", None
                        continue
                    new_text = o.text + self.tokenizer.decode([tok])
                    hit = next((s for s in params.stop if s in new_text), None)
                    if hit is not None:
                        cut = new_text.index(hit) + (len(hit) if params.include_stop_str_in_output else 0)
                        new_text = new_text[:cut]
                        o.finish_reason, o.stop_reason = "stop", hit
                    elif len(o.token_ids) >= max_tokens:
                        o.finish_reason = "length"
                    o.delta_text = new_text[len(o.text):]
                    o.text = new_text
                done = all(o.finished for o in outs)
                plps = None
                if params.prompt_logprobs is not None:
                    plps = [None] + [Logprob(t, -1.0, 1, [(t, -1.0)]) for t in ids[1:]]
                if metrics.first_token_time is None:
                    metrics.first_token_time = time.monotonic()
                if done:
                    self.blocks.pop(request_id, None)
                    metrics.finished_time = time.monotonic()
                if params.output_kind == RequestOutputKind.DELTA and sent_plps:
                    plps = None
                sent_plps = True
                if params.output_kind != RequestOutputKind.FINAL_ONLY or done:
                    yield _as_kind(RequestOutput(request_id, prompt, ids, outs, done, prompt_logprobs=plps,
                                                 metrics=metrics), params.output_kind)
                if done:
                    return
        finally:
            if request_id in self.blocks:
                await self.abort(request_id)


def _as_kind(out: RequestOutput, kind: RequestOutputKind) -> RequestOutput:
    """The engine's output in the shape the request asked for (DELTA: only the new part; else a copy)."""
    import dataclasses

    if kind == RequestOutputKind.DELTA:
        outs = [CompletionOutput(index=o.index, text=o.delta_text, token_ids=list(o.delta_token_ids),
                                 logprobs=list(o.delta_logprobs or []) if o.logprobs is not None else None,
                                 finish_reason=o.finish_reason, stop_reason=o.stop_reason, delta_text=o.delta_text,
                                 delta_token_ids=list(o.delta_token_ids), delta_logprobs=o.delta_logprobs)
                for o in out.outputs if o.delta_token_ids or o.finish_reason]
        return dataclasses.replace(out, outputs=outs)
    outs = [dataclasses.replace(o, token_ids=list(o.token_ids),
                                logprobs=list(o.logprobs) if o.logprobs is not None else None) for o in out.outputs]
    return dataclasses.replace(out, outputs=outs)
