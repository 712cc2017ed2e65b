"""In-process fakes for the router's fast tests: an aiohttp.web backend whose answers a test sets, and the
router itself on an ephemeral port (tokenmill.router.app.RouterServer), both on the test's event loop."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Optional

from aiohttp import web

from tokenmill.router.app import Router, RouterConfig, RouterServer

SSE_EVENTS = 24


class FakeBackend:
    """GET /v1/models, /health, /metrics; POST /v1/completions answers whole or as an SSE stream (`stream`),
    or `mode` says how to fail: "close" (drop the connection without answering), "503", "close-reused" (drop
    a connection's second and later requests without answering). Records what it saw."""

    def __init__(self, name: str = "fake-model"):
        self.name = name
        self.mode = ""
        self.healthy = True
        self.step_s = 0.002
        self.delay_s = 0.0  # before answering a completion
        self.events = SSE_EVENTS
        self.requests: list[dict] = []  # {"path", "headers", "body", "peer"}
        self.peers: set = set()  # upstream connections seen (the router's side of each)
        self.cancelled = 0  # streams whose client went away
        self.in_stream = 0
        self.url = ""
        self._runner: Optional[web.AppRunner] = None
        self._site: Optional[web.TCPSite] = None

    async def start(self) -> "FakeBackend":
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/v1/completions", self.completions)
        app.router.add_route("*", "/v1/chat/completions", self.completions)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        port = self._site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=200 if self.healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="tokenmill:num_requests_running 0\ntokenmill:num_requests_waiting 0\n")

    def event(self, i: int) -> bytes:
        return b"data: " + json.dumps({"choices": [{"index": 0, "text": f"tok{i} " * (i % 3 + 1)}]}).encode() + b"\n\n"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername")
        reused = peer in self.peers
        self.peers.add(peer)
        body = await request.read()
        self.requests.append({"path": request.path_qs, "headers": dict(request.headers), "body": body,
                              "peer": peer, "method": request.method})
        if self.mode == "close" or (self.mode == "close-reused" and reused):
            request.transport.close()
            raise ConnectionResetError("dropped by the fake backend")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
            if request.transport is None or request.transport.is_closing():
                self.cancelled += 1
                return web.Response(status=499)
        if self.mode == "503":
            return web.json_response({"error": "overloaded"}, status=503)
        stream = bool(body) and json.loads(body).get("stream")
        if not stream:
            return web.json_response({"choices": [{"text": "hello"}], "backend": self.url,
                                      "kv_transfer_params": {"first_token_id": 7}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        self.in_stream += 1
        try:
            for i in range(self.events):
                await resp.write(self.event(i))
                await asyncio.sleep(self.step_s)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        finally:
            self.in_stream -= 1
        return resp


@contextlib.asynccontextmanager
async def running_router(*backend_urls: str, **kw) -> AsyncIterator[tuple[Router, str]]:
    """The router over backend_urls (or the prefill= / decode= URLs in kw) on 127.0.0.1, an ephemeral port;
    yields (router, its URL)."""
    hasher = kw.pop("hasher", None)
    cfg = RouterConfig(backends=list(backend_urls) or None, policy=kw.pop("policy", "round-robin"), port=0,
                       health_interval_s=kw.pop("health_interval_s", 30.0), **kw)
    router = Router(cfg, hasher=hasher)
    await router.start()
    srv = RouterServer(router)
    port = await srv.listen("127.0.0.1", 0)
    try:
        yield router, f"http://127.0.0.1:{port}"
    finally:
        await srv.close()


async def raw_exchange(url: str, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to url's host:port; everything read back until the peer closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


class ScriptedBackend:
    """A raw asyncio backend: GET /v1/models, /health, /metrics answered with keep-alive; any other request gets
    `script`, a list of bytes to write (a float: seconds to wait first), then the connection closes."""

    def __init__(self, script: list):
        self.script = script
        self.server: Optional[asyncio.AbstractServer] = None
        self.url = ""

    async def start(self) -> "ScriptedBackend":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path in (b"/v1/models", b"/health", b"/metrics"):
                    body = b'{"data": [{"id": "scripted"}]}' if path == b"/v1/models" else b"ok"
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                for step in self.script:
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
