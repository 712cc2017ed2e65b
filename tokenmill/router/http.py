"""The router's HTTP/1.1 server side: one asyncio Protocol per client connection, parsed by httptools (no ASGI
framework, no task per request). A complete request goes to the handler, which answers either with
`respond()` (the router's own small responses) or by writing a relayed response's bytes (`write()`) and then
calling `finish()`. One request is answered at a time (pipelined ones wait in order). While a request is
being answered, `exchange` is the object that hears about the client: `client_gone()` when the connection
drops, `client_paused(bool)` when the client stops (or resumes) reading what is written to it."""
from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from http import HTTPStatus
from typing import Any, Callable, Optional

import httptools

logger = logging.getLogger("tokenmill.router")

MAX_HEAD_BYTES = 64 * 1024  # request line + headers
KEEP_ALIVE_S = 5.0  # an idle keep-alive client connection is closed after this (as uvicorn does)


class Request:
    """One parsed client request; `target` is the request line's path and query as sent (bytes)."""

    __slots__ = ("method", "target", "path", "query", "headers", "body", "keep_alive", "http_minor")

    def __init__(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool, http_minor: int):
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.keep_alive, self.http_minor = keep_alive, http_minor
        path, _, query = target.partition(b"?")
        self.path, self.query = path.decode("latin-1"), query.decode("latin-1")


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


def error_body(status: int, message: str, code: str, param: Optional[str] = None) -> bytes:
    kind = "service_unavailable" if status == 503 else "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode()


class ClientConnection(asyncio.Protocol):
    def __init__(self, handler: Callable[["ClientConnection", Request], None], max_body_bytes: int,
                 on_close: Optional[Callable[["ClientConnection"], None]] = None):
        self.handler, self.max_body_bytes, self.on_close = handler, max_body_bytes, on_close
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self.exchange: Any = None  # what answers the current request (client_gone / client_paused)
        self.closed = False
        self.busy = False
        self.current: Optional[Request] = None  # the request being answered
        self.paused = False  # the client's socket buffer is full: the exchange was told to hold back
        self._reading_paused = False
        self._ready: deque[Request] = deque()
        self._idle: Optional[asyncio.TimerHandle] = None
        self._url, self._headers, self._body, self._size = b"", [], [], 0

    # --- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        while data:
            try:
                self.parser.feed_data(data)
                break
            except httptools.HttpParserUpgrade as e:
                if not self._ready:  # CONNECT, or an upgrade before its request is complete
                    self._reject(400, "connection upgrades are not supported by the router", "bad_request")
                    return
                # an Upgrade header (h2c, websocket) on a whole request: answered as plain HTTP/1.1 (as
                # uvicorn does); parsing goes on after it
                data = data[e.args[0]:]
            except httptools.HttpParserCallbackError as e:
                rej = e.__context__
                if isinstance(rej, _Reject):
                    self._reject(rej.status, str(rej), rej.code)
                else:
                    self._reject(400, f"bad HTTP request: {e}", "bad_request")
                return
            except httptools.HttpParserError as e:
                self._reject(400, f"bad HTTP request: {e}", "bad_request")
                return
        if self._ready and not self.busy:
            self._next()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.client_gone()
        if self.on_close is not None:
            self.on_close(self)

    def pause_writing(self) -> None:
        self.paused = True
        if self.exchange is not None:
            self.exchange.client_paused(True)

    def resume_writing(self) -> None:
        self.paused = False
        if self.exchange is not None:
            self.exchange.client_paused(False)

    # --- httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", [], [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)
        if self._size > MAX_HEAD_BYTES:
            raise _Reject(414, f"the request line is over {MAX_HEAD_BYTES} bytes", "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._size += len(name) + len(value) + 4
        if self._size > MAX_HEAD_BYTES:
            raise _Reject(431, f"the request headers are over {MAX_HEAD_BYTES} bytes", "headers_too_large")

    def on_headers_complete(self) -> None:
        self._size = 0  # from here: body bytes
        for name, value in self._headers:
            n = name.lower()
            if n == b"content-length" and value.strip().isdigit() and int(value) > self.max_body_bytes:
                raise _Reject(413, f"the request body is over {self.max_body_bytes} bytes", "body_too_large")
            if n == b"expect" and value.lower() == b"100-continue" and not self._ready and not self.busy:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body_bytes:
            raise _Reject(413, f"the request body is over {self.max_body_bytes} bytes", "body_too_large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        p = self.parser
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._ready.append(Request(p.get_method().decode(), self._url, self._headers, body, p.should_keep_alive(),
                                   p.get_http_version() == "1.1"))
        self._url, self._headers, self._body = b"", [], []
        if len(self._ready) > 16 and not self._reading_paused:  # a client pipelining far ahead: wait for it
            self._reading_paused = True
            self.transport.pause_reading()

    # --- answering
    def _next(self) -> None:
        req = self._ready.popleft()
        self.busy, self.current = True, req
        if self._reading_paused and len(self._ready) < 16:
            self._reading_paused = False
            self.transport.resume_reading()
        if not req.target.startswith(b"/"):
            self.respond(400, error_body(400, "the request target must be a path (origin form)", "bad_request"),
                         keep_alive=False)
            return
        try:
            self.handler(self, req)
        except Exception as e:  # noqa: BLE001 - a bug answers 500, it does not kill the connection silently
            logger.exception("router error on %s %s", req.method, req.path)
            if self.busy and self.exchange is None:
                self.respond(500, error_body(500, f"router error: {type(e).__name__}: {e}", "internal_error"),
                             keep_alive=False)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def respond(self, status: int, body: bytes, content_type: bytes = b"application/json",
                keep_alive: bool = True) -> None:
        """A whole response of the router's own (errors, /health, /metrics), then finish()."""
        if self.closed:
            self.finish(False)
            return
        keep = keep_alive and self.current is not None and self.current.keep_alive
        head = b"%scontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            status_line(status), content_type, len(body), b"" if keep else b"connection: close\r\n")
        self.transport.write(head + body)
        self.finish(keep)

    def finish(self, keep_alive: bool) -> None:
        """The current request is answered; the connection stays open for the next one when keep_alive and the
        client asked for that, else it closes (after the bytes written)."""
        keep_alive = keep_alive and self.current is not None and self.current.keep_alive
        self.exchange, self.current = None, None
        self.busy = False
        if self.closed:
            return
        if not keep_alive:
            self.transport.close()
            self.closed = True
            return
        if self._ready:
            self._next()
        else:
            self._arm_idle()

    def _reject(self, status: int, message: str, code: str) -> None:
        """A request the parser cannot take: answer it (unless another is being answered) and close."""
        if self.closed:
            return
        if not self.busy:
            self.transport.write(b"%scontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                                 % (status_line(status), len(body := error_body(status, message, code))) + body)
        self.transport.close()
        self.closed = True
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.client_gone()

    def _arm_idle(self) -> None:
        if not self.closed:
            self._idle = asyncio.get_running_loop().call_later(KEEP_ALIVE_S, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if not self.busy and not self.closed:
            self.transport.close()
            self.closed = True
