"""A tiny OpenAI-compatible streaming server (raw asyncio, HTTP/1.1 keep-alive, chunked SSE).

It answers instantly (or after configurable delays) with N tokens "tok0 tok1 ...". Used to check the
benchmark client's measurements and its own overhead. Run alone: `python tests/bench/stub_server.py --port 0`
prints `PORT <n>` once listening.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class StubConfig:
    """Behaviour of the stub. tokens=None answers with the request's max_tokens tokens."""

    tokens: Optional[int] = None
    tokens_per_chunk: int = 1
    include_usage: bool = True  # honour stream_options.include_usage
    fail_every: int = 0  # every k-th completion request (1-based) gets `fail_status`
    fail_status: int = 429
    ttft_s: float = 0.0
    itl_s: float = 0.0
    model: str = "stub-model"


@dataclass
class StubState:
    """What the stub saw (request bodies in arrival order, with arrival times)."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    count: int = 0


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj: Any) -> bytes:
    return _chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")


def _simple(status: int, obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 400: "Bad Request"}.get(status, "Error")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, reason.encode(), len(body)) + body)


class StubServer:
    """Runs the stub on 127.0.0.1 in a background thread: `with StubServer(StubConfig()) as s: s.url`."""

    def __init__(self, config: Optional[StubConfig] = None, port: int = 0):
        self.config = config or StubConfig()
        self.state = StubState()
        self.port = port
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._respond(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        if method == "GET" and path == "/v1/models":
            writer.write(_simple(200, {"object": "list", "data": [{"id": cfg.model, "object": "model"}]}))
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            writer.write(_simple(404, {"error": {"message": f"no route {path}"}}))
            return
        body = json.loads(raw)
        self.state.count += 1
        self.state.bodies.append(body)
        self.state.arrivals.append(time.perf_counter())
        if cfg.fail_every and self.state.count % cfg.fail_every == 0:
            writer.write(_simple(cfg.fail_status, {"error": {"message": "overloaded", "type": "rate_limit_error"}}))
            return
        chat = path.endswith("chat/completions")
        n = cfg.tokens if cfg.tokens is not None else int(body.get("max_tokens", 16))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        base = {"id": "cmpl-stub", "object": "chat.completion.chunk" if chat else "text_completion",
                "model": cfg.model}
        if chat:  # real servers open with a role-only delta carrying no content
            writer.write(_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        if cfg.ttft_s:
            await asyncio.sleep(cfg.ttft_s)
        sent = 0
        while sent < n:
            k = min(cfg.tokens_per_chunk, n - sent)
            text = "".join(f"tok{sent + j} " for j in range(k))
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            writer.write(_event({**base, "choices": [choice]}))
            await writer.drain()
            sent += k
            if cfg.itl_s and sent < n:
                await asyncio.sleep(cfg.itl_s)
        fin = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else \
            {"index": 0, "text": "", "finish_reason": "length"}
        writer.write(_event({**base, "choices": [fin]}))
        if cfg.include_usage and (body.get("stream_options") or {}).get("include_usage"):
            writer.write(_event({**base, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n,
                                                                  "total_tokens": 7 + n}}))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> "StubServer":
        """Start serving in a daemon thread; returns self once listening."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop the server and its thread."""
        if self._loop is None:
            return
        loop = self._loop

        async def _close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(_close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def _serve_forever(config: StubConfig, port: int) -> None:
    stub = StubServer(config, port)
    await stub._start()
    print(f"PORT {stub.port}", flush=True)
    assert stub._server is not None
    async with stub._server:
        await stub._server.serve_forever()


def main() -> None:
    """Serve in the foreground (for measuring the client from another process)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    args = ap.parse_args()
    try:
        asyncio.run(_serve_forever(StubConfig(tokens=args.tokens, itl_s=args.itl_ms / 1e3), args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
