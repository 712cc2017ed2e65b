"""Request handlers of the OpenAI API over an `EngineClient`: chat completions and completions.

Each handler validates the request, renders/tokenizes the prompt, maps it to SamplingParams, and either
collects the engine's final output (JSON) or turns its deltas into SSE chunks. Errors a client causes
are TokenmillError subclasses (app.py maps them to OpenAI error bodies); engine failures are
EngineRequestError (HTTP 500, or an SSE error event once streaming has begun).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.core.outputs import Logprob
from tokenmill.disagg.params import check_http_request as check_kv_transfer
from tokenmill.disagg.params import response_params as kv_response_params
from tokenmill.engine.protocol import EngineClient
from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import protocol as P
from tokenmill.server.chat_tools import ChatTools, ToolStream, finish_reason, prepare_tools
from tokenmill.server.constraints import check_grammar
from tokenmill.server.generation import (EngineRequestError, Generation, ModelNotFoundError, RequestTimeoutError,
                                         ServerShuttingDownError, SSEResponse, TextChunk, error_body,
                                         merge_generations, sse, stream_error, until_disconnect, usage_of)
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger("tokenmill.server")

__all__ = ["OpenAIServing", "EngineRequestError", "ModelNotFoundError", "RequestTimeoutError",
           "ServerShuttingDownError", "error_body"]


def _served_name(gen: Generation, model_name: str) -> str:
    """The `model` a response names: the adapter the request ran with, else the served model."""
    return gen.lora.lora_name if gen.lora is not None else model_name


def find_bad_text(value: Any, path: str = "") -> Optional[str]:
    """The path of the first string in a request body that is not valid Unicode (a lone surrogate such as
    "\\ud800", which JSON can carry but no tokenizer can encode), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            bad = find_bad_text(k, path) or find_bad_text(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = find_bad_text(v, f"{path}[{i}]")
            if bad:
                return bad
    return None


def check_text(req: Any) -> None:
    bad = find_bad_text(req.model_dump(exclude_none=True))
    if bad is not None:
        raise InvalidRequestError(f"{bad}: the text is not valid Unicode (it contains a lone surrogate such as "
                                  "\\ud800)", param=bad)


# JSON has no -Infinity: a token the grammar (or a logit bias) rules out has logprob -inf, sent as this floor
# (vLLM's), so a constrained request with top_logprobs still gets valid JSON.
LOGPROB_FLOOR = -9999.0


def _floor(v: float) -> float:
    return v if v >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares false: floored too


class OpenAIServing:
    """The chat and completions handlers of one server."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: ServerMetrics,
                 request_timeout_s: Optional[float], stall_timeout_s: float = 30.0,
                 max_tokens_default: Optional[int] = None, tool_call_parser: Optional[str] = None):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_tokens_default = max_tokens_default
        self.tool_call_parser = tool_call_parser
        self._ignored_fields: set[str] = set()  # unknown request fields already logged
        self.in_flight = 0
        self.draining = False
        self._live: dict[str, Generation] = {}
        self.busy_since = time.monotonic()
        self._token_str: Callable[[int], str] = functools.lru_cache(maxsize=1 << 16)(self._decode_one)

    # ------------------------------------------------------------------------------------- bookkeeping

    def begin_request(self, gen: Generation) -> None:
        if self.in_flight == 0:
            self.busy_since = time.monotonic()
        self.in_flight += 1
        self._live[gen.request_id] = gen

    def end_request(self, gen: Generation) -> None:
        if self._live.pop(gen.request_id, None) is not None:
            self.in_flight -= 1

    async def drain(self, grace_s: float) -> None:
        """Shutdown: refuse new requests, let in-flight ones finish for up to grace_s, abort the rest
        (they end with HTTP 503, or an SSE error event when streaming)."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._live):
            await self.engine.abort(rid)

    def lora_for(self, model: Optional[str]):
        """The LoRARequest a request's `model` names (None: the base model)."""
        if model is None or model in (self.model_name, self.engine.model_name):
            return None
        get = getattr(self.engine, "lora_requests", None)
        return next((r for r in (get() if get is not None else []) if r.lora_name == model), None)

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in (self.model_name, self.engine.model_name) and \
                self.lora_for(model) is None:
            raise ModelNotFoundError(f"the model `{model}` does not exist; this server serves `{self.model_name}`")

    def check_fields(self, req: Any) -> None:
        """Refuse fields this server cannot honour; log any other unknown field once (as vLLM does)."""
        extra = getattr(req, "model_extra", None) or {}
        for name, value in extra.items():
            if name in P.UNSUPPORTED and value is not None:
                raise InvalidRequestError(P.UNSUPPORTED[name], param=name)
            if name == "modalities" and value is not None and list(value) != ["text"]:
                raise InvalidRequestError("only the text modality is supported", param="modalities")
            if name not in self._ignored_fields:
                self._ignored_fields.add(name)
                logger.warning("ignoring the request field %r (not used by tokenmill)", name)

    def _decode_one(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def _prepare(self, prompt_ids: list[int], params: SamplingParams,
                 constraint_source: Optional[str] = None) -> SamplingParams:
        """Validate a tokenized request (runs in a worker thread); returns params with the effective
        max_tokens: the request's, else the context left (for kv_eviction="streaming": max_model_len),
        capped by --max-tokens-default."""
        max_tokens = self.engine.processor.validate(prompt_ids, params)
        if params.structured_outputs is not None:
            check_grammar(params.structured_outputs, constraint_source)
        if params.max_tokens is None and self.max_tokens_default is not None:
            max_tokens = min(max_tokens, self.max_tokens_default)
        if max_tokens is not None and max_tokens != params.max_tokens:
            params = params.clone(max_tokens=max_tokens)
        return params

    def _deadline(self) -> Optional[float]:
        return None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s

    def _sse(self, content: AsyncIterator[str], gens: list[Generation]) -> SSEResponse:
        deadlines = [g.deadline for g in gens if g.deadline is not None]
        return SSEResponse(content, self.stall_timeout_s, min(deadlines) if deadlines else None,
                           on_stall=lambda why: self.metrics.requests.labels("stalled").inc())

    async def _start_all(self, gens: list[Generation]) -> None:
        """Start every generation; if one is refused, abort the ones already started."""
        started: list[Generation] = []
        try:
            for g in gens:
                await g.start()
                started.append(g)
        except BaseException:
            for g in started:
                await g.close()
            raise

    async def _collect(self, gens: list[Generation], raw: Request) -> Optional[list[RequestOutput]]:
        """Run to completion (non-streaming); None if the client disconnected (the requests are aborted)."""

        async def run() -> list[RequestOutput]:
            async for _ in merge_generations(gens):
                pass
            return [g.last for g in gens]  # type: ignore[misc]

        task = asyncio.create_task(run())
        watcher = asyncio.create_task(until_disconnect(raw))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
            return task.result()
        finally:
            watcher.cancel()
            for g in gens:
                await g.close()

    # ------------------------------------------------------------------------------------------ logprobs

    def _chat_logprobs(self, lps: Optional[list[Logprob]], top_n: int) -> Optional[P.ChatLogprobs]:
        if lps is None:
            return None
        content = []
        for lp in lps:
            tok = self._token_str(lp.token_id)
            top = [P.ChatLogprobTop(token=(s := self._token_str(t)), logprob=_floor(v), bytes=list(s.encode()))
                   for t, v in lp.top[:top_n]]
            content.append(P.ChatLogprobToken(token=tok, logprob=_floor(lp.logprob), bytes=list(tok.encode()),
                                              top_logprobs=top))
        return P.ChatLogprobs(content=content)

    def vllm_prompt_logprobs(self, lps: Optional[list[Optional[Logprob]]], token_ids: list[int],
                             top_n: int) -> list[Optional[dict[str, Any]]]:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} holding the prompt token and the top_n most likely ones."""
        lps = list(lps or [])
        out: list[Optional[dict[str, Any]]] = []
        for i, tid in enumerate(token_ids):
            lp = lps[i] if i < len(lps) else None
            if lp is None:
                out.append(None)
                continue
            entry = {str(t): {"logprob": _floor(v), "rank": r + 1, "decoded_token": self._token_str(t)}
                     for r, (t, v) in enumerate(lp.top[:top_n])}
            entry.setdefault(str(lp.token_id), {"logprob": _floor(lp.logprob), "rank": lp.rank,
                                                "decoded_token": self._token_str(lp.token_id)})
            out.append(entry)
        return out

    def _completion_logprobs(self, lps: list[Optional[Logprob]], token_ids: list[int], top_n: int,
                             offset: int) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for i, tid in enumerate(token_ids):
            tok = self._token_str(tid)
            lp = lps[i] if i < len(lps) else None
            out.tokens.append(tok)
            out.text_offset.append(offset)
            offset += len(tok)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_floor(lp.logprob))
            top = {self._token_str(t): _floor(v) for t, v in lp.top[:top_n]}
            top.setdefault(tok, _floor(lp.logprob))
            out.top_logprobs.append(top)
        return out

    # -------------------------------------------------------------------------------------------- chat

    async def prepare_chat(self, messages: list[dict[str, Any]], params: SamplingParams, source: Optional[str],
                           tools_in: Optional[list[dict[str, Any]]] = None, tool_choice: Any = None,
                           parallel_tool_calls: Optional[bool] = None, add_generation_prompt: bool = True,
                           continue_final_message: bool = False,
                           chat_template_kwargs: Optional[dict[str, Any]] = None,
                           param_prefix: str = "messages",
                           count_only: bool = False) -> tuple[list[int], SamplingParams, ChatTools]:
        """The chat path every chat-shaped API shares (chat completions, Responses, Anthropic Messages):
        OpenAI-shaped template messages and tools in; the prompt's token ids, the validated params (with the
        tool constraint when a call is required) and the request's ChatTools out. count_only: render the
        prompt without validating it for generation (token counting)."""
        for i, m in enumerate(messages):
            if m.get("content") is None and not (m.get("role") == "assistant" and m.get("tool_calls")):
                raise InvalidRequestError(f"{param_prefix}[{i}].content: a {m.get('role')} message needs a "
                                          "content (null is allowed only for an assistant message with "
                                          "tool_calls)", param=f"{param_prefix}[{i}].content")
        template = getattr(self.engine.tokenizer, "chat_template", None)
        tools = prepare_tools(messages, tools_in, tool_choice, parallel_tool_calls,
                              template if isinstance(template, str) else None, None, self.tool_call_parser)
        if tools.constraint is not None:
            if params.structured_outputs is not None:
                raise InvalidRequestError(f"{source} cannot be combined with a required tool call "
                                          "(tool_choice required or a named function)", param=source)
            params, source = params.clone(structured_outputs=tools.constraint), "tools"
        if tools.active and tools.parser_name == "mistral":
            params = params.clone(skip_special_tokens=False)  # [TOOL_CALLS] is a special token
        add_gen = add_generation_prompt and not continue_final_message
        kwargs = dict(chat_template_kwargs or {})
        if continue_final_message:  # the template leaves the last (assistant) turn open
            kwargs["continue_final_message"] = True

        def render() -> tuple[list[int], SamplingParams]:  # tokenizer work stays off the event loop
            try:
                ids = list(self.engine.processor.apply_chat_template(
                    tools.messages, add_generation_prompt=add_gen, tools=tools.template_tools, **kwargs))
            except TokenmillError:
                raise
            except Exception as e:  # errors the model's template raises on odd input
                raise InvalidRequestError(f"cannot apply the chat template: {e}", param=param_prefix) from e
            return ids, (params if count_only else self._prepare(ids, params, source))

        prompt_ids, params = await asyncio.to_thread(render)
        return prompt_ids, params, tools

    async def chat(self, req: P.ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        self.check_fields(req)
        check_text(req)
        params = req.to_sampling_params()
        check_kv_transfer(params.kv_transfer_params, bool(req.stream))
        source = req.constraint()[1]
        messages = [m.to_template_dict() for m in req.messages]
        tools_in = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompt_ids, params, tools = await self.prepare_chat(
            messages, params, source, tools_in, req.tool_choice, req.parallel_tool_calls, req.add_generation_prompt,
            req.continue_final_message, req.chat_template_kwargs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = Generation(self, rid, prompt_ids, params, self._deadline(), bool(req.stream), arrival,
                         lora=self.lora_for(req.model))
        await gen.start()
        top_n = req.top_logprobs or 0
        if req.stream:
            return self._sse(self._chat_stream(gen, rid, params.n, top_n, req.include_usage, tools,
                                               req.prompt_logprobs), [gen])
        finals = await self._collect([gen], raw)
        if finals is None:
            return Response(status_code=499)
        final = finals[0]
        choices = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            message, reason = P.ChatResponseMessage(content=o.text), o.finish_reason
            if tools.active:
                parsed = tools.parser().parse(o.text)
                calls = [c.to_openai() for c in parsed.tool_calls]
                message = P.ChatResponseMessage(content=parsed.content, tool_calls=calls or None)
                reason = finish_reason(reason, len(calls))
            choices.append(P.ChatChoice(index=o.index, message=message,
                                        logprobs=self._chat_logprobs(o.logprobs, top_n) if req.logprobs else None,
                                        finish_reason=reason, stop_reason=o.stop_reason))
        plps = (self.vllm_prompt_logprobs(final.prompt_logprobs, final.prompt_token_ids, req.prompt_logprobs)
                if req.prompt_logprobs is not None else None)
        body = P.ChatCompletionResponse(id=rid, model=_served_name(gen, self.model_name), choices=choices,
                                        usage=gen.usage(), prompt_logprobs=plps)
        if params.kv_transfer_params is not None and final.outputs:
            body.kv_transfer_params = kv_response_params(params.kv_transfer_params, final.outputs[0].token_ids,
                                                         self.engine)
        return JSONResponse(body.model_dump(exclude_none=True))

    async def _chat_stream(self, gen: Generation, rid: str, n: int, top_n: int,
                           include_usage: bool, tools: Optional[ChatTools] = None,
                           prompt_logprobs: Optional[int] = None) -> AsyncIterator[str]:
        created = int(time.time())
        plps = None
        if prompt_logprobs is not None:  # Generation.start prefetched them all: they go in the first chunk
            plps = self.vllm_prompt_logprobs(gen.pending.prompt_logprobs if gen.pending else None,
                                             gen.prompt_ids, prompt_logprobs)

        head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": _served_name(gen, self.model_name)}
        text_chunk = TextChunk(head, chat=True, usage=include_usage)

        def chunk(choices: list[dict[str, Any]], usage: Optional[P.UsageInfo] = None) -> str:
            nonlocal plps
            body: dict[str, Any] = {**head, "choices": choices}
            if include_usage:
                body["usage"] = usage.model_dump() if usage else None
            if plps is not None:
                body["prompt_logprobs"], plps = plps, None
            return sse(body)

        parsers = {i: ToolStream(tools) for i in range(n)} if tools is not None and tools.active else {}
        try:
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            sent = _Sent()
            async for out in gen.outputs():
                for idx, text, _ids, lps, finish, stop_reason in sent.deltas(0, out):
                    if finish is None and lps is None and plps is None and idx not in parsers:
                        yield text_chunk(idx, text)
                        continue
                    clp = self._chat_logprobs(lps, top_n) if lps is not None else None
                    if idx in parsers:
                        deltas = parsers[idx].feed(text) + (parsers[idx].finish() if finish is not None else [])
                        finish = finish_reason(finish, parsers[idx].num_calls)
                    else:
                        deltas = [{"content": text}]
                    if finish is not None or not deltas:
                        deltas.append({})  # the finish reason (and logprobs) go in a chunk of their own
                    for k, delta in enumerate(deltas):
                        last = k == len(deltas) - 1
                        choice: dict[str, Any] = {"index": idx, "delta": delta,
                                                  "logprobs": clp.model_dump() if (clp and last) else None,
                                                  "finish_reason": finish if last else None}
                        if finish is not None and last:
                            choice["stop_reason"] = stop_reason
                        if delta or last:
                            yield chunk([choice])
            if include_usage:
                yield chunk([], gen.usage())
        except (TokenmillError, EngineRequestError) as e:
            yield sse(stream_error(e))
        finally:
            await gen.close()
        yield sse("[DONE]")

    # ------------------------------------------------------------------------------ tokenize / detokenize

    async def tokenize(self, req: P.TokenizeRequest) -> P.TokenizeResponse:
        self.check_model(req.model)
        check_text(req)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
        proc = self.engine.processor

        def run() -> list[int]:
            if req.messages is not None:
                return list(proc.apply_chat_template([m.to_template_dict() for m in req.messages],
                                                     add_generation_prompt=req.add_generation_prompt))
            if req.add_special_tokens:
                return list(proc.tokenize(req.prompt))
            return list(self.engine.tokenizer.encode(req.prompt, add_special_tokens=False))

        ids = await asyncio.to_thread(run)
        return P.TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids)

    async def detokenize(self, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        self.check_model(req.model)
        vocab = self.engine.processor.vocab_size if hasattr(self.engine.processor, "vocab_size") else None
        for i, t in enumerate(req.tokens):
            if t < 0 or (vocab is not None and t >= vocab):
                raise InvalidRequestError(f"tokens[{i}] = {t} is not a token id of this model", param=f"tokens[{i}]")
        text = await asyncio.to_thread(self.engine.tokenizer.decode, req.tokens)
        return P.DetokenizeResponse(prompt=text)

    # ------------------------------------------------------------------------------------- completions

    async def completion(self, req: P.CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        self.check_fields(req)
        check_text(req)
        params = req.to_sampling_params()
        source = req.constraint()[1]
        score_only = req.max_tokens == 0
        if score_only and req.stream:
            raise InvalidRequestError("max_tokens=0 is not supported with stream=true", param="max_tokens")
        prompts = req.prompts()
        check_kv_transfer(params.kv_transfer_params, bool(req.stream), len(prompts))
        if len(prompts) * params.n > P.MAX_N:
            raise InvalidRequestError(f"at most {P.MAX_N} completions (prompts x n) per request, "
                                      f"got {len(prompts) * params.n}", param="n")
        rid = f"cmpl-{uuid.uuid4().hex}"

        def tokenize_all() -> list[tuple[list[int], SamplingParams]]:
            out = []
            for p in prompts:
                ids = list(self.engine.processor.tokenize(p)) if isinstance(p, str) else list(p)
                out.append((ids, self._prepare(ids, params.clone(), source)))
            return out

        prepared = await asyncio.to_thread(tokenize_all)
        gens = [Generation(self, f"{rid}-{i}", ids, prm, self._deadline(), bool(req.stream), arrival,
                           lora=self.lora_for(req.model))
                for i, (ids, prm) in enumerate(prepared)]
        texts = [p if isinstance(p, str) else None for p in prompts]
        await self._start_all(gens)
        if req.stream:
            return self._sse(self._completion_stream(gens, texts, rid, req), gens)
        finals = await self._collect(gens, raw)
        if finals is None:
            return Response(status_code=499)
        choices = []
        for pi, final in enumerate(finals):
            prompt_text = self._prompt_text(texts[pi], final.prompt_token_ids) if req.echo else ""
            for o in sorted(final.outputs, key=lambda o: o.index):
                ids, lps, text = list(o.token_ids), list(o.logprobs or []), o.text
                if score_only:
                    ids, lps, text = [], [], ""
                logprobs = None
                if req.logprobs is not None:
                    all_ids, all_lps = ids, lps
                    if req.echo:
                        plps = list(final.prompt_logprobs or [None] * len(final.prompt_token_ids))
                        all_ids, all_lps = list(final.prompt_token_ids) + ids, plps + lps
                    logprobs = self._completion_logprobs(all_lps, all_ids, req.logprobs, 0)
                choices.append(P.CompletionChoice(
                    index=pi * params.n + o.index, text=prompt_text + text, logprobs=logprobs,
                    finish_reason="length" if score_only else o.finish_reason, stop_reason=o.stop_reason))
        usage = usage_of(gens)
        if score_only:
            usage = P.UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=0,
                                total_tokens=usage.prompt_tokens)
        body = P.CompletionResponse(id=rid, model=_served_name(gens[0], self.model_name), choices=choices,
                                    usage=usage)
        if params.kv_transfer_params is not None and finals[0].outputs:
            body.kv_transfer_params = kv_response_params(params.kv_transfer_params, finals[0].outputs[0].token_ids,
                                                         self.engine)
        return JSONResponse(body.model_dump(exclude_none=True))

    def _prompt_text(self, text: Optional[str], ids: list[int]) -> str:
        return text if text is not None else self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    async def _completion_stream(self, gens: list[Generation], texts: list[Optional[str]], rid: str,
                                 req: P.CompletionRequest) -> AsyncIterator[str]:
        created, n, include_usage = int(time.time()), req.n, req.include_usage
        head = {"id": rid, "object": "text_completion", "created": created,
                "model": _served_name(gens[0], self.model_name)}
        text_chunk = TextChunk(head, chat=False, usage=include_usage)

        def chunk(choices: list[dict[str, Any]], usage: Optional[P.UsageInfo] = None) -> str:
            body: dict[str, Any] = {**head, "choices": choices}
            if include_usage:
                body["usage"] = usage.model_dump() if usage else None
            return sse(body)

        offsets: dict[int, int] = {}  # choice index -> characters sent so far (logprobs text_offset)
        try:
            if req.echo:
                for pi, g in enumerate(gens):
                    ptext = self._prompt_text(texts[pi], g.prompt_ids)
                    for s in range(n):
                        choice: dict[str, Any] = {"index": pi * n + s, "text": ptext, "logprobs": None,
                                                  "finish_reason": None}
                        if req.logprobs is not None:
                            plps = list((g.pending.prompt_logprobs if g.pending else None)
                                        or [None] * len(g.prompt_ids))
                            choice["logprobs"] = self._completion_logprobs(
                                plps, g.prompt_ids, req.logprobs, 0).model_dump()
                        offsets[pi * n + s] = len(ptext)
                        yield chunk([choice])
            sent = _Sent()
            async for pi, out in merge_generations(gens):
                for idx, text, ids, lps, finish, stop_reason in sent.deltas(pi * n, out):
                    if finish is None and (lps is None or req.logprobs is None):
                        yield text_chunk(idx, text)
                        continue
                    choice = {"index": idx, "text": text, "logprobs": None, "finish_reason": finish}
                    if req.logprobs is not None and lps is not None:
                        lp = self._completion_logprobs(lps, ids, req.logprobs, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp.tokens)
                        choice["logprobs"] = lp.model_dump()
                    if finish is not None:
                        choice["stop_reason"] = stop_reason
                    yield chunk([choice])
            if include_usage:
                yield chunk([], usage_of(gens))
        except (TokenmillError, EngineRequestError) as e:
            yield sse(stream_error(e))
        finally:
            for g in gens:
                await g.close()
        yield sse("[DONE]")


class _Sent:
    """Which choices of a stream have finished, so each DELTA output yields exactly its new part."""

    def __init__(self) -> None:
        self.finished: set[int] = set()

    def deltas(self, base: int, out: RequestOutput):
        """Yields (choice index, new text, new token ids, new logprobs or None, finish reason if it just
        finished else None, stop reason) for each choice of `out` that changed."""
        for o in sorted(out.outputs, key=lambda o: o.index):
            idx = base + o.index
            if idx in self.finished:
                continue
            finish = o.finish_reason
            if not o.text and not o.token_ids and finish is None:
                continue
            if finish is not None:
                self.finished.add(idx)
            lps = list(o.logprobs) if o.logprobs is not None else None
            yield idx, o.text, list(o.token_ids), lps, finish, o.stop_reason
