"""The router's upstream side: keep-alive HTTP/1.1 connections to one backend (a pool per backend), each an
asyncio Protocol with httptools' response parser. Only a response's head is parsed into status and headers
(for the sink to rewrite); its body bytes, chunk framing included, go to the sink as they arrive, and the
parser only watches them for the end of the response (no Python callback per body chunk).

A sink is what one request's response goes to: `up_head(up, status, headers) -> bool` (False: drop this
response and its connection), `up_data(bytes)` (first with the bytes that came with the head, possibly
none), `up_done(up)` once the response is complete, and `up_lost(up, why)` when the connection fails before
that. A sink that only passes the body on may set the connection's `relay` to a writer (the client's
transport.write): the rest of the body then goes straight there."""
from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import httptools

MAX_RESPONSE_HEAD = 256 * 1024


class UpstreamError(Exception):
    """The backend failed before answering (connect error, reset, closed, unparseable response)."""


class UpstreamPool:
    """Idle keep-alive connections to one backend (most recently used first); new ones on demand."""

    def __init__(self, url: str, connect_timeout_s: float):
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.host_header = b"host: " + parts.netloc.encode() + b"\r\n"
        self.connect_timeout_s = connect_timeout_s
        self.idle: list[UpstreamConnection] = []
        self.open: set[UpstreamConnection] = set()

    def take(self) -> Optional["UpstreamConnection"]:
        """An idle connection (marked reused), or None."""
        while self.idle:
            up = self.idle.pop()
            if not up.closed:
                up.reused = True
                return up
        return None

    async def connect(self) -> "UpstreamConnection":
        """A new connection; UpstreamError when it cannot be made within connect_timeout_s."""
        loop = asyncio.get_running_loop()
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl,
                                       server_hostname=self.host if self.ssl else None), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamError(f"timed out connecting (after {self.connect_timeout_s:g} s)") from None
        except OSError as e:
            raise UpstreamError(f"cannot connect: {e.strerror or e}") from None
        return up

    def close(self) -> None:
        for up in list(self.open):
            up.abort()
        self.idle.clear()


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self.sink: Any = None
        self.relay: Optional[Callable[[bytes], Any]] = None  # where the rest of the body goes, set by the sink
        self.closed = False
        self.reused = False  # taken from the idle pool (it may have been closed by the backend meanwhile)
        self.got_bytes = False  # any byte of the current response has arrived
        self._in_head = True
        self._head = b""
        self.raw_head = b""  # the current response's head as received
        self._headers: list[tuple[bytes, bytes]] = []
        self._keep_alive = False

    def send(self, sink: Any, request: bytes) -> None:
        """Send one request (the whole message); its response goes to sink."""
        self.sink, self.relay = sink, None
        self.got_bytes, self._in_head, self._head, self._headers = False, True, b"", []
        self.transport.write(request)

    def abort(self) -> None:
        """Drop the connection now (the backend sees the disconnect and aborts the request)."""
        self.sink = self.relay = None
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def pause(self, paused: bool) -> None:
        if not self.closed:
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # --- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.pool.open.add(self)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:  # the body of a relayed response, as it comes
            relay(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as e:
                self._fail(f"bad HTTP response: {e}")
            return
        sink = self.sink
        if sink is None:  # bytes nobody asked for (an idle connection): it cannot be reused
            self.abort()
            return
        self.got_bytes = True
        if self._in_head:
            buf = self._head + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    self._fail(f"response head over {MAX_RESPONSE_HEAD} bytes")
                else:
                    self._head = buf
                return
            self._in_head, self._head = False, b""
            head, data = buf[:end + 4], buf[end + 4:]
            self.raw_head = head
            if not self._feed(head) or self.sink is not sink:  # failed, declined, or complete (no body)
                return
        sink.up_data(data)
        if data:
            self._feed(data)

    def _feed(self, data: bytes) -> bool:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"bad HTTP response: {e}")
            return False
        return True

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed, self.relay = True, None
        self.pool.open.discard(self)
        if self.sink is None and self in self.pool.idle:  # an idle connection the backend closed
            self.pool.idle.remove(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.up_lost(self, f"connection lost: {exc}" if exc else "the backend closed the connection")

    def _fail(self, why: str) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.up_lost(self, why)

    # --- httptools callbacks (during _feed)
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        sink = self.sink
        if sink is None:
            return
        self._keep_alive = self.parser.should_keep_alive()
        if not sink.up_head(self, self.parser.get_status_code(), self._headers):
            self.abort()

    def on_message_complete(self) -> None:
        sink, self.sink, self.relay = self.sink, None, None
        if sink is None:
            return
        if self._keep_alive and not self.closed:
            self.reused = False
            self.pool.idle.append(self)
        else:
            self.closed = True
            self.transport.close()
        sink.up_done(self)


class _BodyReader:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)


def decode_body(raw_head: bytes, raw_body: bytes) -> bytes:
    """The payload of a whole response given as its raw head and body bytes (chunk framing removed)."""
    r = _BodyReader()
    httptools.HttpResponseParser(r).feed_data(raw_head + raw_body)
    return b"".join(r.parts)


class Fetch:
    """A sink that keeps the whole response: `await fetch.result` gives (status, headers, payload);
    UpstreamError when the connection fails first."""

    def __init__(self) -> None:
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._raw: list[bytes] = []

    def up_head(self, up: UpstreamConnection, status: int, headers: list) -> bool:
        self.status, self.headers = status, headers
        return True

    def up_data(self, data: bytes) -> None:
        self._raw.append(data)

    def up_done(self, up: UpstreamConnection) -> None:
        if not self.result.done():
            try:
                self.result.set_result((self.status, self.headers, decode_body(up.raw_head, b"".join(self._raw))))
            except httptools.HttpParserError as e:
                self.result.set_exception(UpstreamError(f"bad HTTP response: {e}"))

    def up_lost(self, up: UpstreamConnection, why: str) -> None:
        if not self.result.done():
            self.result.set_exception(UpstreamError(why))


async def fetch(pool: UpstreamPool, request_for: Any) -> tuple[int, list, bytes]:
    """Send request_for(pool) to the backend and return its whole response; a reused connection that turns
    out closed before answering is replaced by a new one once. Cancelling drops the connection."""
    up = pool.take()
    while True:
        if up is None:
            up = await pool.connect()
        f = Fetch()
        up.send(f, request_for(pool))
        try:
            return await f.result
        except UpstreamError:
            if up.reused and not up.got_bytes:
                up = None
                continue
            raise
        except BaseException:
            up.abort()
            raise
