"""What stands between a socket and the routes: a read timeout for request headers (a uvicorn protocol
subclass) and for bodies, the body size limit, Bearer auth on /v1, and response counting."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.config import ServerConfig
from tokenmill.server.generation import error_body
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger("tokenmill.server")


def header_timeout_protocol(read_timeout_s: float) -> type:
    """uvicorn's HTTP protocol class, closing a connection whose request headers have not all arrived
    within read_timeout_s of its first byte (or of the connection), with a 408: half-sent requests
    (slowloris) cannot hold connections open. uvicorn's own keep-alive timeout covers idle connections."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    body = json.dumps(error_body(f"the request headers were not received within {read_timeout_s:g} s",
                                 "timeout_error", None, "read_timeout")).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._awaiting_headers():
                if self._header_timer is None:
                    self._arm_header_timer()
            elif self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc: Any) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(read_timeout_s, self._on_header_timeout)

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._awaiting_headers():
                return
            logger.info("closing a connection that sent no complete request headers in %g s", read_timeout_s)
            self.transport.write(reply)
            self.transport.close()

    return HeaderTimeoutProtocol


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Bearer (or x-api-key) auth on /v1, request-body size limit (413) and read timeout (408), and response counting,
    before any routing."""

    def __init__(self, app: ASGIApp, config: ServerConfig, metrics: ServerMetrics, routes: tuple[str, ...]):
        self.app = app
        self.key = config.api_key.encode() if config.api_key else None
        self.limit = config.max_request_body_bytes
        self.read_timeout_s = config.read_timeout_s
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in self.routes else "other"
        status_seen: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send, path)
        finally:
            if status_seen:
                self.metrics.http_responses.labels(route, str(status_seen[0])).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None and (path == "/v1" or path.startswith("/v1/")):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            bearer_ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
            x_key = headers.get(b"x-api-key")  # Anthropic's clients send the key this way
            if not bearer_ok and not (x_key is not None and hmac.compare_digest(x_key.strip(), self.key)):
                message = "invalid or missing API key (use Authorization: Bearer <key>, or x-api-key: <key>)"
                body = error_body(message, "authentication_error", None, "invalid_api_key")
                if path == "/v1/messages" or path.startswith("/v1/messages/"):
                    body = {"type": "error", "error": {"type": "authentication_error", "message": message}}
                await _send_json(send, 401, body, ((b"www-authenticate", b"Bearer"),))
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_big = error_body(f"request body exceeds {self.limit} bytes", "invalid_request_error", None,
                             "request_too_large")
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            await _send_json(send, 413, too_big)
            return
        chunks, size = [], 0
        deadline = time.monotonic() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except (TimeoutError, asyncio.TimeoutError):
                await _send_json(send, 408, error_body(
                    f"the request body was not received within {self.read_timeout_s:g} s", "timeout_error", None,
                    "read_timeout"), ((b"connection", b"close"),))
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _send_json(send, 413, too_big)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


