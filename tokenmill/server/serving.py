"""Request handlers of the OpenAI API over an `EngineClient`: chat completions and completions.

Each handler validates the request, renders/tokenizes the prompt, maps it to SamplingParams, and either
collects the engine's final output (JSON) or turns its deltas into SSE chunks. Errors a client causes
are TokenmillError subclasses (app.py maps them to OpenAI error bodies); engine failures are
EngineRequestError (HTTP 500, or an SSE error event once streaming has begun).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.core.outputs import Logprob
from tokenmill.engine.protocol import EngineClient
from tokenmill.errors import SLO_REJECTED_MESSAGE, EngineOverloadedError, InvalidRequestError, TokenmillError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import protocol as P
from tokenmill.server.metrics import ServerMetrics


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (HTTP 404)."""

    http_status = 404

    def __init__(self, message: str):
        super().__init__(message, param="model", code="model_not_found")


class RequestTimeoutError(TokenmillError):
    """The request ran past the server's per-request time limit (HTTP 408); it was aborted."""

    http_status = 408
    error_type = "timeout_error"


class ServerShuttingDownError(TokenmillError):
    """The server is draining for shutdown and takes no new requests (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable"


class EngineRequestError(RuntimeError):
    """The engine failed while serving this request (HTTP 500)."""


def error_body(message: str, err_type: str, param: Optional[str] = None,
               code: Optional[Union[str, int]] = None) -> dict[str, Any]:
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=err_type, param=param, code=code)).model_dump()


def _sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class _Timing:
    """Per-request timestamps measured in the handler (time.monotonic())."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None
    num_tokens: int = 0


class _Generation:
    """One engine request: prefetches the first output (so input errors surface before any response
    byte), enforces the deadline, records metrics, and aborts the request when closed early."""

    def __init__(self, serving: "OpenAIServing", request_id: str, prompt_ids: list[int],
                 params: SamplingParams, deadline: Optional[float]):
        self.s = serving
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.deadline = deadline
        self.timing = _Timing()
        self.last: Optional[RequestOutput] = None
        self._gen: Optional[AsyncIterator[RequestOutput]] = None
        self._pending: Optional[RequestOutput] = None
        self._done = False

    async def _next(self) -> RequestOutput:
        assert self._gen is not None
        if self.deadline is None:
            return await self._gen.__anext__()
        try:
            if hasattr(asyncio, "timeout_at"):  # Python >= 3.11: no extra task per token
                async with asyncio.timeout_at(self.deadline):
                    return await self._gen.__anext__()
            return await asyncio.wait_for(self._gen.__anext__(), max(0.0, self.deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):
            self._done = True
            self.s.metrics.requests.labels("timeout").inc()
            raise RequestTimeoutError(f"request timed out after {self.s.request_timeout_s:g} s and was aborted",
                                      code="timeout") from None

    async def start(self) -> None:
        if self.s.draining:
            raise ServerShuttingDownError("the server is shutting down", code="shutting_down")
        self.s.begin_request(self)
        try:
            self._gen = self.s.engine.generate(None, self.params, self.request_id,
                                               prompt_token_ids=self.prompt_ids)
            self._pending = await self._next()
        except BaseException:
            self._done = True
            await self.close()
            raise

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yields the engine's outputs until the finished one; raises EngineRequestError on engine failure."""
        while True:
            if self._pending is not None:
                out, self._pending = self._pending, None
            else:
                try:
                    out = await self._next()
                except StopAsyncIteration:
                    raise EngineRequestError(f"engine stream of {self.request_id} ended without a final output")
            if out.finished and self.last is not None and not out.prompt_token_ids:
                out = _as_aborted(self.last)  # the engine's bare "aborted" marker: keep what we have
            self._observe(out)
            self.last = out
            if out.error == SLO_REJECTED_MESSAGE:
                self._done = True
                self.s.metrics.requests.labels("rejected").inc()
                raise EngineOverloadedError(out.error, code="slo_rejected")
            if out.error is not None or any(o.finish_reason == "error" for o in out.outputs):
                self._done = True
                self.s.metrics.requests.labels("error").inc()
                raise EngineRequestError(out.error or "the engine failed while running this request")
            yield out
            if out.finished:
                self._done = True
                self._finish(out)
                return

    def _observe(self, out: RequestOutput) -> None:
        n_tokens = max((len(o.token_ids) for o in out.outputs), default=0)
        if n_tokens > 0 and self.timing.first_token is None:
            self.timing.first_token = time.monotonic()
            self.s.metrics.ttft.observe(self.timing.first_token - self.timing.arrival)
        self.timing.num_tokens = n_tokens

    def _finish(self, out: RequestOutput) -> None:
        m, now, t = self.s.metrics, time.monotonic(), self.timing
        m.e2e.observe(now - t.arrival)
        if t.first_token is not None and t.num_tokens > 1:
            m.tpot.observe((now - t.first_token) / (t.num_tokens - 1))
        rm = out.metrics
        if rm is not None and rm.first_scheduled_time is not None:
            m.queue_time.observe(max(0.0, rm.first_scheduled_time - rm.arrival_time))
        reason = out.outputs[0].finish_reason if out.outputs else None
        m.requests.labels(reason or "unknown").inc()
        m.prompt_tokens.inc(len(out.prompt_token_ids))
        m.completion_tokens.inc(sum(len(o.token_ids) for o in out.outputs))

    async def close(self) -> None:
        """Release the engine stream; a request that has not finished is aborted (its KV freed)."""
        gen, self._gen = self._gen, None
        unfinished = not (self.last is not None and self.last.finished)
        try:
            if gen is not None and hasattr(gen, "aclose"):
                await gen.aclose()  # type: ignore[attr-defined]
            if unfinished and gen is not None:
                await self.s.engine.abort(self.request_id)
                if not self._done:
                    self.s.metrics.requests.labels("abort").inc()
        finally:
            self._done = True
            self.s.end_request(self)


async def _merge(gens: list[_Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several generations as they arrive: (index into gens, output)."""
    if len(gens) == 1:
        async for out in gens[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: _Generation) -> None:
        try:
            async for out in g.outputs():
                await queue.put((i, out, None))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    live = len(gens)
    try:
        while live:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                live -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(raw: Request) -> None:
    """Returns when the client has gone away (the body was already read)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    """The chat and completions handlers of one server."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: ServerMetrics,
                 request_timeout_s: Optional[float]):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.in_flight = 0
        self.draining = False
        self._live: dict[str, _Generation] = {}
        self.busy_since = time.monotonic()
        self._token_str: Callable[[int], str] = functools.lru_cache(maxsize=1 << 16)(self._decode_one)

    # ------------------------------------------------------------------------------------- bookkeeping

    def begin_request(self, gen: _Generation) -> None:
        if self.in_flight == 0:
            self.busy_since = time.monotonic()
        self.in_flight += 1
        self._live[gen.request_id] = gen

    def end_request(self, gen: _Generation) -> None:
        if self._live.pop(gen.request_id, None) is not None:
            self.in_flight -= 1

    async def drain(self, grace_s: float) -> None:
        """Shutdown: refuse new requests, let in-flight ones finish for up to grace_s, abort the rest
        (their streams end with finish_reason "abort")."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._live):
            await self.engine.abort(rid)

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in (self.model_name, self.engine.model_name):
            raise ModelNotFoundError(f"the model `{model}` does not exist; this server serves `{self.model_name}`")

    def _decode_one(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def _prepare(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Validate a tokenized request (runs in a worker thread); returns params with the effective
        max_tokens."""
        max_tokens = self.engine.processor.validate(prompt_ids, params)
        if max_tokens is not None and max_tokens != params.max_tokens:
            params = params.clone(max_tokens=max_tokens)
        return params

    def _deadline(self) -> Optional[float]:
        return None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s

    async def _start_all(self, gens: list[_Generation]) -> None:
        """Start every generation; if one is refused, abort the ones already started."""
        started: list[_Generation] = []
        try:
            for g in gens:
                await g.start()
                started.append(g)
        except BaseException:
            for g in started:
                await g.close()
            raise

    async def _collect(self, gens: list[_Generation], raw: Request) -> Optional[list[RequestOutput]]:
        """Run to completion (non-streaming); None if the client disconnected (the requests are aborted)."""

        async def run() -> list[RequestOutput]:
            async for _ in _merge(gens):
                pass
            return [g.last for g in gens]  # type: ignore[misc]

        task = asyncio.create_task(run())
        watcher = asyncio.create_task(_until_disconnect(raw))
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
            top = [P.ChatLogprobTop(token=(s := self._token_str(t)), logprob=v, bytes=list(s.encode()))
                   for t, v in lp.top[:top_n]]
            content.append(P.ChatLogprobToken(token=tok, logprob=lp.logprob, bytes=list(tok.encode()),
                                              top_logprobs=top))
        return P.ChatLogprobs(content=content)

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
            out.token_logprobs.append(lp.logprob)
            top = {self._token_str(t): v for t, v in lp.top[:top_n]}
            top.setdefault(tok, lp.logprob)
            out.top_logprobs.append(top)
        return out

    # -------------------------------------------------------------------------------------------- chat

    async def chat(self, req: P.ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        params = req.to_sampling_params()
        messages = [m.to_template_dict() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        add_gen = req.add_generation_prompt and not req.continue_final_message

        def render() -> tuple[list[int], SamplingParams]:  # tokenizer work stays off the event loop
            try:
                ids = list(self.engine.processor.apply_chat_template(messages, add_generation_prompt=add_gen,
                                                                     tools=tools))
            except TokenmillError:
                raise
            except Exception as e:  # errors the model's template raises on odd input
                raise InvalidRequestError(f"cannot apply the chat template: {e}", param="messages") from e
            return ids, self._prepare(ids, params)

        prompt_ids, params = await asyncio.to_thread(render)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = _Generation(self, rid, prompt_ids, params, self._deadline())
        await gen.start()
        top_n = req.top_logprobs or 0
        if req.stream:
            return StreamingResponse(self._chat_stream(gen, rid, params.n, top_n, req.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = await self._collect([gen], raw)
        if finals is None:
            return Response(status_code=499)
        final = finals[0]
        choices = [P.ChatChoice(index=o.index, message=P.ChatResponseMessage(content=o.text),
                                logprobs=self._chat_logprobs(o.logprobs, top_n) if req.logprobs else None,
                                finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                   for o in sorted(final.outputs, key=lambda o: o.index)]
        body = P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices,
                                        usage=_usage([final]))
        return JSONResponse(body.model_dump(exclude_none=True))

    async def _chat_stream(self, gen: _Generation, rid: str, n: int, top_n: int,
                           include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: Optional[P.UsageInfo] = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_name, "choices": choices}
            if include_usage:
                body["usage"] = usage.model_dump() if usage else None
            return _sse(body)

        try:
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            sent = _Sent()
            async for out in gen.outputs():
                for idx, text, _ids, lps, finish, stop_reason in sent.deltas(0, out):
                    clp = self._chat_logprobs(lps, top_n) if lps is not None else None
                    choice: dict[str, Any] = {"index": idx, "delta": {"content": text},
                                              "logprobs": clp.model_dump() if clp else None,
                                              "finish_reason": finish}
                    if finish is not None:
                        choice["stop_reason"] = stop_reason
                    yield chunk([choice])
            if include_usage and gen.last is not None:
                yield chunk([], _usage([gen.last]))
        except (TokenmillError, EngineRequestError) as e:
            yield _sse(_stream_error(e))
        finally:
            await gen.close()
        yield _sse("[DONE]")

    # ------------------------------------------------------------------------------------- completions

    async def completion(self, req: P.CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        params = req.to_sampling_params()
        score_only = req.max_tokens == 0
        if score_only and req.stream:
            raise InvalidRequestError("max_tokens=0 is not supported with stream=true", param="max_tokens")
        prompts = req.prompts()
        if len(prompts) * params.n > P.MAX_N:
            raise InvalidRequestError(f"at most {P.MAX_N} completions (prompts x n) per request, "
                                      f"got {len(prompts) * params.n}", param="n")
        rid = f"cmpl-{uuid.uuid4().hex}"
        def tokenize_all() -> list[tuple[list[int], SamplingParams]]:
            out = []
            for p in prompts:
                ids = list(self.engine.processor.tokenize(p)) if isinstance(p, str) else list(p)
                out.append((ids, self._prepare(ids, params.clone())))
            return out

        prepared = await asyncio.to_thread(tokenize_all)
        gens = [_Generation(self, f"{rid}-{i}", ids, prm, self._deadline()) for i, (ids, prm) in enumerate(prepared)]
        texts = [p if isinstance(p, str) else None for p in prompts]
        await self._start_all(gens)
        if req.stream:
            return StreamingResponse(self._completion_stream(gens, texts, rid, req),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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
        usage = _usage(finals)
        if score_only:
            usage = P.UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=0,
                                total_tokens=usage.prompt_tokens)
        body = P.CompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(body.model_dump(exclude_none=True))

    def _prompt_text(self, text: Optional[str], ids: list[int]) -> str:
        return text if text is not None else self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    async def _completion_stream(self, gens: list[_Generation], texts: list[Optional[str]], rid: str,
                                 req: P.CompletionRequest) -> AsyncIterator[str]:
        created, n, include_usage = int(time.time()), req.n, req.include_usage

        def chunk(choices: list[dict[str, Any]], usage: Optional[P.UsageInfo] = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                                    "model": self.model_name, "choices": choices}
            if include_usage:
                body["usage"] = usage.model_dump() if usage else None
            return _sse(body)

        offsets: dict[int, int] = {}  # choice index -> characters sent so far (logprobs text_offset)
        try:
            if req.echo:
                for pi, g in enumerate(gens):
                    ptext = self._prompt_text(texts[pi], g.prompt_ids)
                    for s in range(n):
                        choice: dict[str, Any] = {"index": pi * n + s, "text": ptext, "logprobs": None,
                                                  "finish_reason": None}
                        if req.logprobs is not None:
                            plps = list((g._pending.prompt_logprobs if g._pending else None)
                                        or [None] * len(g.prompt_ids))
                            choice["logprobs"] = self._completion_logprobs(
                                plps, g.prompt_ids, req.logprobs, 0).model_dump()
                        offsets[pi * n + s] = len(ptext)
                        yield chunk([choice])
            sent = _Sent()
            async for pi, out in _merge(gens):
                for idx, text, ids, lps, finish, stop_reason in sent.deltas(pi * n, out):
                    choice = {"index": idx, "text": text, "logprobs": None, "finish_reason": finish}
                    if req.logprobs is not None and lps is not None:
                        lp = self._completion_logprobs(lps, ids, req.logprobs, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp.tokens)
                        choice["logprobs"] = lp.model_dump()
                    if finish is not None:
                        choice["stop_reason"] = stop_reason
                    yield chunk([choice])
            if include_usage:
                yield chunk([], _usage([g.last for g in gens if g.last is not None]))
        except (TokenmillError, EngineRequestError) as e:
            yield _sse(_stream_error(e))
        finally:
            for g in gens:
                await g.close()
        yield _sse("[DONE]")


class _Sent:
    """What a stream has sent per choice, so each update yields exactly the new part (from the
    cumulative fields, whatever the engine puts in delta_*)."""

    def __init__(self) -> None:
        self.chars: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def deltas(self, base: int, out: RequestOutput):
        """Yields (choice index, new text, new token ids, new logprobs or None, finish reason if it just
        finished else None, stop reason) for each choice of `out` that changed."""
        for o in sorted(out.outputs, key=lambda o: o.index):
            idx = base + o.index
            if idx in self.finished:
                continue
            c, t = self.chars.get(idx, 0), self.tokens.get(idx, 0)
            text, ids = o.text[c:], list(o.token_ids[t:])
            finish = o.finish_reason
            if not text and not ids and finish is None:
                continue
            lps = list(o.logprobs[t:]) if o.logprobs is not None else None
            self.chars[idx], self.tokens[idx] = len(o.text), len(o.token_ids)
            if finish is not None:
                self.finished.add(idx)
            yield idx, text, ids, lps, finish, o.stop_reason


def _as_aborted(last: RequestOutput) -> RequestOutput:
    """`last` with every unfinished sample marked aborted and no new deltas."""
    outs = [dataclasses.replace(o, delta_text="", delta_token_ids=[], delta_logprobs=None,
                                finish_reason=o.finish_reason or "abort") for o in last.outputs]
    return dataclasses.replace(last, outputs=outs, finished=True)


def _usage(finals: list[RequestOutput]) -> P.UsageInfo:
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _stream_error(e: Exception) -> dict[str, Any]:
    if isinstance(e, TokenmillError):
        return error_body(e.message, e.error_type, e.param, e.code or e.http_status)
    return error_body(str(e) or "internal error", "internal_server_error", None, 500)
