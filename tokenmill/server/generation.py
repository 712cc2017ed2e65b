"""One engine request as the HTTP handlers see it (`Generation`), the server's error types, and the SSE
response that bounds how long a client may stop reading.

Streams ask the engine for DELTA outputs (only what is new), non-streaming requests for FINAL_ONLY (one
output at the end): nothing is copied per step, and a client that stops reading costs memory linear in
its output (the engine merges pending deltas) until the stall timeout aborts it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from json.encoder import encode_basestring as _encode_str  # json.dumps(str, ensure_ascii=False)'s encoder
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Send

from tokenmill.errors import SLO_REJECTED_MESSAGE, EngineOverloadedError, InvalidRequestError, TokenmillError
from tokenmill.outputs import RequestOutput, merge_delta_outputs
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.server import protocol as P

logger = logging.getLogger("tokenmill.server")


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
    """The server is draining for shutdown: it takes no new requests, and requests it had to abort end
    with this error (HTTP 503, or an SSE error event once streaming has begun)."""

    http_status = 503
    error_type = "service_unavailable"


class EngineRequestError(RuntimeError):
    """The engine failed while serving this request (HTTP 500)."""


def error_body(message: str, err_type: str, param: Optional[str] = None,
               code: Optional[Union[str, int]] = None) -> dict[str, Any]:
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=err_type, param=param, code=code)).model_dump()


def sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class TextChunk:
    """The SSE event of a streamed chunk with one choice that carries only text: a completion's
    {"index", "text", "logprobs": null, "finish_reason": null} or a chat's {"index", "delta": {"content"},
    "logprobs": null, "finish_reason": null} (most chunks of a stream). The body's fixed fields are
    serialized once: byte for byte what `sse` gives for the same dict, at a fraction of json.dumps's cost."""

    def __init__(self, head: dict[str, Any], chat: bool, usage: bool):
        fixed = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
        self._head = f'data: {fixed[:-1]},"choices":[{{"index":'
        self._mid = ',"delta":{"content":' if chat else ',"text":'
        close = "}" if chat else ""
        usage_part = ',"usage":null' if usage else ""
        self._tail = f'{close},"logprobs":null,"finish_reason":null}}]{usage_part}}}\n\n'

    def __call__(self, index: int, text: str) -> str:
        return f"{self._head}{index:d}{self._mid}{_encode_str(text)}{self._tail}"


def stream_error(e: Exception) -> dict[str, Any]:
    if isinstance(e, TokenmillError):
        return error_body(e.message, e.error_type, e.param, e.code or e.http_status)
    return error_body(str(e) or "internal error", "internal_server_error", None, 500)


class Generation:
    """One engine request: enforces the deadline, records metrics from the engine's RequestMetrics (the one
    copy of a request's timing), and aborts the request when closed early. A streaming generation
    prefetches its first output, so input errors surface before any response byte."""

    def __init__(self, serving: Any, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 deadline: Optional[float], stream: bool, arrival: Optional[float] = None, lora: Any = None):
        self.s = serving
        self.lora = lora  # the LoRARequest the request's `model` named (None: the base model)
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.stream = stream
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        self.params = params if params.output_kind == kind else params.clone(output_kind=kind)
        self.deadline = deadline
        self.arrival = time.monotonic() if arrival is None else arrival
        self.last: Optional[RequestOutput] = None  # the latest output (the final one once finished)
        self.completion_tokens = 0  # generated tokens over all samples (streams see deltas only)
        self.pending: Optional[RequestOutput] = None
        self._gen: Optional[AsyncIterator[RequestOutput]] = None
        self._done = False
        self._finished = False

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
            kw = {"lora_request": self.lora} if self.lora is not None else {}
            self._gen = self.s.engine.generate(None, self.params, self.request_id,
                                               prompt_token_ids=self.prompt_ids, arrival_time=self.arrival, **kw)
            if self.stream:
                self.pending = await self._next()
                # echo with prompt logprobs: a chunked prompt sends its logprobs over several outputs
                want = len(self.prompt_ids) if self.params.prompt_logprobs is not None else 0
                while (not self.pending.finished and len(self.pending.prompt_logprobs or []) < want):
                    self.pending = merge_delta_outputs(self.pending, await self._next())
        except BaseException:
            self._done = True
            await self.close()
            raise

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yields the engine's outputs until the finished one; raises EngineRequestError on engine failure
        and ServerShuttingDownError for a request aborted by the shutdown drain."""
        while True:
            if self.pending is not None:
                out, self.pending = self.pending, None
            else:
                try:
                    out = await self._next()
                except StopAsyncIteration:
                    raise EngineRequestError(f"engine stream of {self.request_id} ended without a final output")
            self.last = out
            self.completion_tokens += sum(len(o.token_ids) for o in out.outputs) if self.stream else 0
            if out.error == SLO_REJECTED_MESSAGE:
                self._done = True
                self.s.metrics.requests.labels("rejected").inc()
                raise EngineOverloadedError(out.error, code="slo_rejected")
            if out.error is not None or any(o.finish_reason == "error" for o in out.outputs):
                self._done = True
                self.s.metrics.requests.labels("error").inc()
                raise EngineRequestError(out.error or "the engine failed while running this request")
            if any(o.finish_reason == "abort" for o in out.outputs):
                self._done = True
                self.s.metrics.requests.labels("abort").inc()
                why = "the server is shutting down" if self.s.draining else "the engine aborted it"
                raise ServerShuttingDownError(f"the request was aborted before it finished: {why}",
                                              code="aborted")
            if not self.stream:
                self.completion_tokens = sum(len(o.token_ids) for o in out.outputs)
            yield out
            if out.finished:
                self._done = self._finished = True
                self._record(out)
                return

    def _record(self, out: RequestOutput) -> None:
        m, rm, now = self.s.metrics, out.metrics, time.monotonic()
        if rm is not None:
            m.e2e.observe((rm.finished_time or now) - rm.arrival_time)
            if rm.first_token_time is not None:
                m.ttft.observe(rm.first_token_time - rm.arrival_time)
                n = self.completion_tokens // max(1, len(out.outputs))
                if n > 1:
                    m.tpot.observe(((rm.finished_time or now) - rm.first_token_time) / (n - 1))
            if rm.first_scheduled_time is not None:
                m.queue_time.observe(max(0.0, rm.first_scheduled_time - rm.arrival_time))
        reason = out.outputs[0].finish_reason if out.outputs else None
        m.requests.labels(reason or "unknown").inc()
        m.prompt_tokens.inc(len(self.prompt_ids))
        m.completion_tokens.inc(self.completion_tokens)

    def usage(self) -> P.UsageInfo:
        return usage_of([self])

    async def close(self) -> None:
        """Release the engine stream; a request that has not finished is aborted (its KV freed)."""
        gen, self._gen = self._gen, None
        try:
            if gen is not None and hasattr(gen, "aclose"):
                await gen.aclose()  # type: ignore[attr-defined]
            if not self._finished and gen is not None:
                await self.s.engine.abort(self.request_id)
                if not self._done:
                    self.s.metrics.requests.labels("abort").inc()
        finally:
            self._done = True
            self.s.end_request(self)


def usage_of(gens: list[Generation]) -> P.UsageInfo:
    p = sum(len(g.prompt_ids) for g in gens)
    c = sum(g.completion_tokens for g in gens)
    return P.UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def merge_generations(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several generations as they arrive: (index into gens, output)."""
    if len(gens) == 1:
        async for out in gens[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
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


async def until_disconnect(raw: Request) -> None:
    """Returns when the client has gone away (the body was already read)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose every write must complete within `stall_timeout_s` (and
    before the request's deadline): a client that stops reading has its request aborted and its
    connection closed, instead of holding the request, its KV blocks and a growing buffer forever."""

    def __init__(self, content: AsyncIterator[str], stall_timeout_s: float,
                 deadline: Optional[float] = None, on_stall: Optional[Callable[[str], None]] = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stall_timeout_s = stall_timeout_s
        self.deadline = deadline
        self.on_stall = on_stall

    async def _send(self, send: Send, message: dict) -> None:
        limit = self.stall_timeout_s
        if self.deadline is not None:
            limit = min(limit, max(0.0, self.deadline - time.monotonic()))
        try:
            await asyncio.wait_for(send(message), limit)
        except (TimeoutError, asyncio.TimeoutError):
            raise _Stalled(limit) from None

    async def stream_response(self, send: Send) -> None:
        body: Any = self.body_iterator
        try:
            await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
            async for chunk in body:
                data = chunk if isinstance(chunk, (bytes, memoryview)) else chunk.encode(self.charset)
                await self._send(send, {"type": "http.response.body", "body": data, "more_body": True})
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except _Stalled as e:
            # the response stays incomplete: the server closes the connection
            why = (f"the client read nothing for {e.seconds:.1f} s" if e.seconds >= self.stall_timeout_s
                   else "the request timed out while the client was not reading")
            logger.warning("aborting a stream: %s", why)
            if self.on_stall is not None:
                self.on_stall(why)
        finally:
            if hasattr(body, "aclose"):
                await body.aclose()  # the generator's finally aborts the engine request


class _Stalled(Exception):
    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds
