"""`tokenmill router`: an async HTTP proxy over tokenmill backends.

Every /v1 request (and /tokenize, /detokenize, /version) is sent to one backend that the routing policy
picks (tokenmill/router/policy.py); the response (status, headers, body, SSE stream) is passed back byte for
byte as it arrives (tokenmill/router/proxy.py). A backend that fails before its first response byte
(connection refused or reset, HTTP 502/503/504) is marked down and the request is sent to another; once
bytes have reached the client, a failure is the client's to see. A client that goes away closes the
upstream connection, and the backend aborts the request. /health (200 while a backend is up) and /metrics
are the router's own. The server is a plain asyncio protocol with httptools (tokenmill/router/http.py): no
ASGI framework and no task per proxied request on its hot path.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from tokenmill.errors import ConfigError
from tokenmill.router.backends import BackendSet
from tokenmill.router.http import ClientConnection, Request, error_body
from tokenmill.router.metrics import RouterMetrics
from tokenmill.router.pd import PrefillDecode
from tokenmill.router.policy import POLICIES, make_policy
from tokenmill.router.prompt import CHAT, COMPLETIONS, PromptHasher
from tokenmill.router.proxy import Relay
from tokenmill.router.upstream import UpstreamPool

logger = logging.getLogger("tokenmill.router")

FORWARDED = ("/tokenize", "/detokenize", "/version")  # besides /v1/*
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _meta(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RouterConfig:
    backends: list[str] = _meta(None, "backend base URL, e.g. http://127.0.0.1:8001 (repeat the flag)")
    prefill: list[str] = _meta(None, "disaggregated serving: base URL of a prefill instance (`serve --kv-role "
                                     "producer`; repeat the flag); the routing policy picks among them; needs --decode")
    decode: list[str] = _meta(None, "disaggregated serving: base URL of a decode instance (`serve --kv-role "
                                    "consumer`; repeat the flag); the least-loaded one continues each request")
    policy: str = _meta("prefix", "routing policy", choices=list(POLICIES))
    host: str = _meta("127.0.0.1", "address to bind")
    port: int = _meta(8000, "TCP port to listen on")
    model: Optional[str] = _meta(None, "prefix policy: the backends' model (for its tokenizer and chat template; "
                                       "default: the bundled SmolLM2, as `tokenmill serve`)")
    tokenizer: Optional[str] = _meta(None, "prefix policy: tokenizer folder (default: the model's)")
    block_size: int = _meta(16, "prefix policy: the backends' --block-size (hashes are per KV block)")
    max_prefix_blocks: int = _meta(256, "prefix policy: leading prompt blocks hashed per request")
    prefix_lru_blocks: int = _meta(1 << 18, "prefix policy: block hashes remembered (LRU)")
    balance_abs: int = _meta(8, "prefix policy: a backend whose load exceeds the least-loaded one's by more than "
                                "this many requests (and by balance_rel x) is overloaded")
    balance_rel: float = _meta(1.5, "prefix policy: see balance_abs")
    max_kv_usage: float = _meta(0.95, "prefix policy: a backend with this KV usage or more is overloaded")
    health_interval_s: float = _meta(1.0, "seconds between health and load checks of each backend")
    unhealthy_after: int = _meta(2, "failed health checks in a row that mark a backend down (one passing check "
                                    "marks it up); a failed request marks it down at once")
    check_timeout_s: float = _meta(5.0, "timeout of one health / load check")
    connect_timeout_s: float = _meta(5.0, "timeout to connect to a backend (then the next one is tried)")
    startup_timeout_s: float = _meta(10.0, "at start, how long each backend has to answer GET /v1/models")
    max_request_bytes: int = _meta(64 << 20, "largest request body the router takes (413 above)")

    def validate(self) -> None:
        if self.prefill or self.decode:
            if self.backends:
                raise ConfigError("give --backend URLs (replicas), or --prefill with --decode URLs "
                                  "(disaggregated), not both")
            if not self.prefill or not self.decode:
                raise ConfigError("disaggregated serving needs at least one --prefill and one --decode URL")
            overlap = {u.rstrip("/") for u in self.prefill} & {u.rstrip("/") for u in self.decode}
            if overlap:
                raise ConfigError(f"{sorted(overlap)[0]} is given as both a prefill and a decode instance")
        elif not self.backends:
            raise ConfigError("give at least one --backend URL (or --prefill and --decode URLs)")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("max_prefix_blocks", "prefix_lru_blocks", "unhealthy_after", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("health_interval_s", "check_timeout_s", "connect_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


class Router:
    def __init__(self, config: RouterConfig, hasher: Optional[PromptHasher] = None):
        config.validate()
        self.config = config
        kw = {}
        if config.policy == "prefix":
            kw = dict(capacity=config.prefix_lru_blocks, balance_abs=config.balance_abs,
                      balance_rel=config.balance_rel, max_kv_usage=config.max_kv_usage)
        self.policy = make_policy(config.policy, **kw)
        check = (config.health_interval_s, config.unhealthy_after, config.check_timeout_s)
        # disaggregated: the policy picks the prefill instance (where the prompt's prefix is cached); the
        # decode instances (self.set, which also answers every other route) go by least load
        self.pd: Optional[PrefillDecode] = None
        if config.prefill:
            pset = BackendSet(config.prefill, *check, on_down=self.policy.forget_backend)
            self.set = BackendSet(config.decode, *check)
            self.pd = PrefillDecode(self, pset)
        else:
            self.set = BackendSet(config.backends, *check, on_down=self.policy.forget_backend)
        if self.policy.needs_hashes and hasher is None:
            hasher = PromptHasher.for_model(config.model, config.tokenizer, config.block_size,
                                            config.max_prefix_blocks)
        self.hasher = hasher
        # keep-alive connections per backend URL
        self.pools = {b.url: UpstreamPool(b.url, config.connect_timeout_s)
                      for bs in self.backend_sets() for b in bs.backends}
        self.retries = 0
        self.unroutable = 0
        self.routed_requests = 0  # /v1/(chat/)completions requests routed (the prefix counters' base)
        self.matched_requests = 0  # ... that went to a backend with a prefix match
        self.prompt_blocks = 0
        self.matched_blocks = 0
        self.overloaded_fallbacks = 0
        self.metrics = RouterMetrics(self)

    def backend_sets(self) -> list[BackendSet]:
        return [self.set] if self.pd is None else [self.pd.prefill, self.set]

    async def start(self) -> None:
        names = await self.set.probe_all(self.config.startup_timeout_s)
        if self.pd is not None:
            pnames = await self.pd.prefill.probe_all(self.config.startup_timeout_s)
            if set(pnames) != set(names):
                raise ConfigError(f"the prefill instances serve {pnames[0]!r}, the decode instances {names[0]!r}")
        for bs in self.backend_sets():
            bs.start()

    async def stop(self) -> None:
        for bs in self.backend_sets():
            await bs.stop()
        for pool in self.pools.values():
            pool.close()

    def handle(self, conn: ClientConnection, req: Request) -> None:
        """Answer one client request (the ClientConnection's handler)."""
        path = req.path
        if path.startswith("/v1/") or path in FORWARDED:
            if req.method not in METHODS:
                conn.respond(405, error_body(405, f"method {req.method} is not allowed on {path} (the router "
                                                  f"forwards {', '.join(METHODS)})", "method_not_allowed"))
                return
            self.forward(conn, req, path)
        elif path in ("/health", "/metrics"):
            if req.method != "GET":
                conn.respond(405, error_body(405, f"{path} takes GET, not {req.method}", "method_not_allowed"))
            elif path == "/health":
                self.health(conn)
            else:
                conn.respond(200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")
        else:
            conn.respond(404, error_body(404, f"no route {req.method} {path} on the router (it forwards /v1/*, "
                                              "/tokenize, /detokenize, /version; /health and /metrics are its own)",
                                         "not_found"))

    def health(self, conn: ClientConnection) -> None:
        up = [len(bs.healthy()) for bs in self.backend_sets()]
        total = sum(len(bs.backends) for bs in self.backend_sets())
        if all(up):
            conn.respond(200, json.dumps({"status": "ok", "backends_up": sum(up), "backends": total}).encode())
        else:
            conn.respond(503, error_body(503, "no backend is up" if len(up) == 1 else
                                         f"prefill instances up: {up[0]}, decode instances up: {up[1]}", "unhealthy"))

    def forward(self, conn: ClientConnection, req: Request, path: str) -> None:
        hashes: list[int] = []
        generation = req.method == "POST" and path in (CHAT, COMPLETIONS)
        parsed: Any = None
        if generation and (self.hasher is not None or self.pd is not None):
            try:
                parsed = json.loads(req.body)
            except ValueError:
                parsed = None
            if self.hasher is not None:
                hashes = self.hasher.hashes(path, parsed)
        if generation and self.pd is not None:
            self.pd.start(conn, req, parsed, hashes)
            return
        policy = self.policy if self.pd is None else self.pd.decode_policy
        Relay(self, conn, req, req.body, self.set, policy, hashes, generation).dispatch()

    def count_routed(self, d: Any, hashes: list[int]) -> None:
        self.routed_requests += 1
        self.prompt_blocks += len(hashes)
        self.matched_blocks += d.matched_blocks
        self.matched_requests += d.matched_blocks > 0
        self.overloaded_fallbacks += d.overloaded_fallback


class RouterServer:
    """The router's listening socket and its client connections."""

    def __init__(self, router: Router):
        self.router = router
        self.conns: set[ClientConnection] = set()
        self.server: Optional[asyncio.AbstractServer] = None

    def _connection(self) -> ClientConnection:
        c = ClientConnection(self.router.handle, self.router.config.max_request_bytes, on_close=self.conns.discard)
        self.conns.add(c)
        return c

    async def listen(self, host: str, port: int) -> int:
        """Start accepting; returns the port (the one picked when port is 0)."""
        try:
            self.server = await asyncio.get_running_loop().create_server(self._connection, host, port,
                                                                         reuse_address=True, backlog=2048)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()
        await self.router.stop()


async def serve_router(config: RouterConfig) -> None:
    """Run the router until SIGINT or SIGTERM."""
    t0 = time.monotonic()
    router = Router(config)
    await router.start()
    srv = RouterServer(router)
    try:
        port = await srv.listen(config.host, config.port)
    except ConfigError:
        await router.stop()
        raise
    urls = [b.url for bs in router.backend_sets() for b in bs.backends]
    print(f"tokenmill router ({config.policy}) on http://{config.host}:{port} over {', '.join(urls)} "
          f"(ready in {time.monotonic() - t0:.1f} s)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await srv.close()
