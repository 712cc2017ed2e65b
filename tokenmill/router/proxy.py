"""One proxied request: sent to a backend that the routing policy picks, its response relayed to the client.

The request goes upstream as one write (the client's method, target and headers less the hop-by-hop ones,
the backend's host, the body with its length) on an idle keep-alive connection of that backend when there is
one (no task is created then), else on a new connection. The response's head is rewritten (hop-by-hop
headers dropped, x-tokenmill-backend added) and its body bytes, chunk framing included, are written to the
client as they arrive. A backend that fails before its response's head (connect error, reset, a closed
connection; HTTP 502/503/504 when another backend is left) is marked down and the request goes to another;
a reused keep-alive connection that the backend had closed meanwhile is replaced by a new one to the same
backend first. After the head, a failure closes the client's connection (it sees a truncated response).
A client that goes away drops the upstream connection: the backend aborts the request."""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from tokenmill.router.backends import RETRY_STATUS, Backend, BackendSet
from tokenmill.router.http import ClientConnection, Request, error_body, status_line
from tokenmill.router.upstream import UpstreamConnection, UpstreamError, UpstreamPool

# not forwarded upstream (hop-by-hop, or set by the router: host, content-length)
_HOP_REQUEST = frozenset({b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
                          b"trailer", b"upgrade", b"content-length", b"expect"})
# not relayed to the client; transfer-encoding and content-length are, with the body's bytes as they came
_HOP_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})


class Outgoing:
    """A client request as sent upstream (all but the host line, which is the backend's)."""

    __slots__ = ("first", "rest")

    def __init__(self, req: Request, body: bytes):
        self.first = b"%s %s HTTP/1.%d\r\n" % (req.method.encode(), req.target, req.http_minor)
        hdrs = b"".join(n + b": " + v + b"\r\n" for n, v in req.headers if n.lower() not in _HOP_REQUEST)
        self.rest = hdrs + b"content-length: %d\r\n\r\n" % len(body) + body

    def to(self, pool: UpstreamPool) -> bytes:
        return self.first + pool.host_header + self.rest


class Relay:
    __slots__ = ("router", "conn", "req", "out", "bset", "policy", "hashes", "count", "tried", "n_cands",
                 "decision", "backend", "holding", "up", "connecting", "head", "started", "gone", "close_after")

    def __init__(self, router: Any, conn: ClientConnection, req: Request, body: bytes, bset: BackendSet,
                 policy: Any, hashes: list[int], count: bool):
        self.router, self.conn, self.req, self.bset, self.policy = router, conn, req, bset, policy
        self.out = Outgoing(req, body)
        self.hashes, self.count = hashes, count
        self.tried: set[int] = set()
        self.n_cands = 0
        self.decision: Any = None
        self.backend: Optional[Backend] = None
        self.holding = False  # counted in backend.load.in_flight
        self.up: Optional[UpstreamConnection] = None
        self.connecting: Optional[asyncio.Future] = None
        self.head: Optional[bytes] = None  # the rewritten response head, written with the first body bytes
        self.started = self.gone = self.close_after = False

    def dispatch(self) -> None:
        """Pick a backend (among those not tried yet) and send the request there."""
        if self.gone:
            return
        self.conn.exchange = self
        bset = self.bset
        cands = [i for i in bset.healthy() if i not in self.tried]
        if not cands:
            self.router.unroutable += 1
            down = "; ".join(f"{b.url}: {b.why_down or 'failed'}" for b in bset.backends)
            self.conn.respond(503, error_body(503, f"no backend is available ({down})", "no_backend"))
            return
        self.n_cands = len(cands)
        d = self.decision = self.policy.choose(cands, bset.loads, self.hashes)
        b = self.backend = bset.backends[d.backend]
        b.load.in_flight += 1
        self.holding = True
        pool = self.router.pools[b.url]
        up = pool.take()
        if up is not None:
            self._send(up)
        else:
            self._open(pool)

    def _open(self, pool: UpstreamPool) -> None:
        self.connecting = asyncio.ensure_future(self._connect(pool))

    async def _connect(self, pool: UpstreamPool) -> None:
        try:
            up = await pool.connect()
        except UpstreamError as e:
            self.connecting = None
            self._failed(str(e))
            return
        self.connecting = None
        if self.gone:
            up.abort()
            return
        self._send(up)

    def _send(self, up: UpstreamConnection) -> None:
        self.up = up
        up.send(self, self.out.to(up.pool))
        if self.conn.paused:
            up.pause(True)

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.backend.load.in_flight -= 1

    def _failed(self, why: str) -> None:
        """The backend failed before its first byte: mark it down and try another."""
        b = self.backend
        self._release()
        b.failures += 1
        self.router.retries += 1
        self.tried.add(b.index)
        self.bset.mark_down(b, why)
        self.dispatch()

    # --- the upstream connection's sink
    def up_head(self, up: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        if status in RETRY_STATUS and self.n_cands > 1:
            up.abort()
            self.up = None
            self._failed(f"HTTP {status}")
            return False
        b, r = self.backend, self.router
        b.requests += 1
        if self.count:
            r.count_routed(self.decision, self.hashes)
        self.policy.routed(b.index, self.hashes)
        parts = [status_line(status)]
        framed = 100 <= status < 200 or status in (204, 304)
        for name, value in headers:
            n = name.lower()
            if n in _HOP_RESPONSE:
                continue
            if n == b"content-length" or n == b"transfer-encoding":
                framed = True
            parts.append(name + b": " + value + b"\r\n")
        parts.append(b"x-tokenmill-backend: " + b.url.encode() + b"\r\n")
        # a body that ends when the backend closes (or a client that wants it) ends the client's connection
        self.close_after = not framed or not self.req.keep_alive or self.req.http_minor == 0
        if self.close_after:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.head = b"".join(parts)
        self.started = True
        return True

    def up_data(self, data: bytes) -> None:
        """The head, with the body bytes that came with it; the rest of the body goes from the upstream
        connection straight to the client's transport."""
        if self.head is not None:
            data, self.head = self.head + data, None
        write = self.conn.transport.write
        write(data)
        if self.up is not None:
            self.up.relay = write

    def up_done(self, up: UpstreamConnection) -> None:
        self.up = None
        self._release()
        if self.head is not None:
            self.conn.transport.write(self.head)
            self.head = None
        self.conn.finish(not self.close_after)

    def up_lost(self, up: UpstreamConnection, why: str) -> None:
        self.up = None
        if not self.started:
            if up.reused and not up.got_bytes:  # an idle connection the backend had closed: a new one
                up.reused = False
                self._open(up.pool)
            else:
                self._failed(why)
            return
        self._release()  # mid-response: the client's connection ends here (for an unframed body: its end)
        if self.head is not None:
            self.conn.transport.write(self.head)
            self.head = None
        self.conn.finish(False)

    # --- the client connection's exchange
    def client_gone(self) -> None:
        self.gone = True
        if self.up is not None:
            self.up.abort()
            self.up = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._release()

    def client_paused(self, paused: bool) -> None:
        if self.up is not None:
            self.up.pause(paused)
