"""`tokenmill router`: an async HTTP proxy over tokenmill backends.

Every /v1 request (and /tokenize, /detokenize) is sent to one backend that the routing policy picks
(tokenmill/router/policy.py); the response (status, headers, body, SSE stream) is passed back byte for
byte as it arrives. A backend that fails before its first response byte (connection refused or reset,
HTTP 502/503/504) is marked down and the request is sent to another; once bytes have reached the
client, a failure is the client's to see. A client that goes away closes the upstream connection, and
the backend aborts the request. /health (200 while a backend is up) and /metrics are the router's own.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.errors import ConfigError
from tokenmill.router.backends import RETRY_STATUS, BackendSet, _why
from tokenmill.router.metrics import RouterMetrics
from tokenmill.router.pd import PrefillDecode
from tokenmill.router.policy import POLICIES, make_policy
from tokenmill.router.prompt import CHAT, COMPLETIONS, PromptHasher

logger = logging.getLogger("tokenmill.router")

_HOP = {"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length"}


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
    log_level: str = _meta("warning", "log level", choices=["debug", "info", "warning", "error"])

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
        for name in ("max_prefix_blocks", "prefix_lru_blocks", "unhealthy_after"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("health_interval_s", "check_timeout_s", "connect_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


def _error(status: int, message: str, code: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "service_unavailable" if status == 503 else
                                   "invalid_request_error", "param": param, "code": code}}, status_code=status)


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
        self.session: Optional[aiohttp.ClientSession] = None
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
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                             connector=aiohttp.TCPConnector(limit=0, force_close=False))
        for bs in self.backend_sets():
            bs.start()

    async def stop(self) -> None:
        for bs in self.backend_sets():
            await bs.stop()
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        hashes: list[int] = []
        generation = request.method == "POST" and path in (CHAT, COMPLETIONS)
        parsed: Any = None
        if generation and (self.hasher is not None or self.pd is not None):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if self.hasher is not None:
                hashes = self.hasher.hashes(path, parsed)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        url_tail = path + (f"?{request.url.query}" if request.url.query else "")
        if generation and self.pd is not None:
            return await self.pd.generate(request, url_tail, headers, body, parsed, hashes)
        policy = self.policy if self.pd is None else self.pd.decode_policy
        return await self.relay(request, url_tail, headers, body, self.set, policy, hashes, generation)

    def count_routed(self, d: Any, hashes: list[int]) -> None:
        self.routed_requests += 1
        self.prompt_blocks += len(hashes)
        self.matched_blocks += d.matched_blocks
        self.matched_requests += d.matched_blocks > 0
        self.overloaded_fallbacks += d.overloaded_fallback

    async def relay(self, request: Request, url_tail: str, headers: list, body: bytes, bset: BackendSet,
                    policy: Any, hashes: list[int], count: bool) -> Response:
        """Send the request to a backend of bset that policy picks (another one when it fails before its first
        byte) and stream its response back."""
        tried: set[int] = set()
        while True:
            cands = [i for i in bset.healthy() if i not in tried]
            if not cands:
                self.unroutable += 1
                down = "; ".join(f"{b.url}: {b.why_down or 'failed'}" for b in bset.backends)
                return _error(503, f"no backend is available ({down})", "no_backend")
            d = policy.choose(cands, bset.loads, hashes)
            b = bset.backends[d.backend]
            b.load.in_flight += 1
            try:
                resp = await self._send(request, b.url + url_tail, headers, body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                self._failed(b, tried, _why(e), bset)
                continue
            except BaseException:
                b.load.in_flight -= 1
                raise
            if resp is None:  # the client went away first
                b.load.in_flight -= 1
                return Response(status_code=499)
            if resp.status in RETRY_STATUS and len(cands) > 1:
                resp.release()
                self._failed(b, tried, f"HTTP {resp.status}", bset)
                continue
            break
        b.requests += 1
        if count:
            self.count_routed(d, hashes)
        policy.routed(b.index, hashes)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP or k.lower() == "content-length"}
        out_headers["x-tokenmill-backend"] = b.url
        return StreamingResponse(self._relay(resp, b), status_code=resp.status, headers=out_headers)

    def _failed(self, b, tried: set, why: str, bset: BackendSet) -> None:
        """b failed before its first byte: release it, mark it down, let the caller try another."""
        b.load.in_flight -= 1
        b.failures += 1
        self.retries += 1
        tried.add(b.index)
        bset.mark_down(b, why)

    async def _send(self, request: Request, url: str, headers: list, body: bytes) -> Optional[aiohttp.ClientResponse]:
        """The upstream response once its headers arrive, or None if the client disconnects first (the
        upstream request is then cancelled, which closes its connection: the backend aborts)."""
        assert self.session is not None
        send = asyncio.ensure_future(self.session.request(request.method, url, headers=headers, data=body,
                                                          allow_redirects=False))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((send, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not send.done():
            send.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await send
            return None
        return send.result()

    async def _relay(self, resp: aiohttp.ClientResponse, b) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        finally:
            b.load.in_flight -= 1
            resp.close()  # on a client disconnect this drops the upstream connection: the backend aborts


async def _disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def build_router_app(router: Router) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await router.stop()

    app = FastAPI(title="tokenmill router", lifespan=lifespan)
    app.state.router = router

    @app.get("/health")
    async def health() -> Response:
        up = [len(bs.healthy()) for bs in router.backend_sets()]
        total = sum(len(bs.backends) for bs in router.backend_sets())
        if all(up):
            return JSONResponse({"status": "ok", "backends_up": sum(up), "backends": total})
        return _error(503, "no backend is up" if len(up) == 1 else
                      f"prefill instances up: {up[0]}, decode instances up: {up[1]}", "unhealthy")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]

    @app.api_route("/v1/{rest:path}", methods=methods)
    async def v1(rest: str, request: Request) -> Response:
        return await router.forward(request, "/v1/" + rest)

    @app.api_route("/{name}", methods=methods)
    async def other(name: str, request: Request) -> Response:
        if name in ("tokenize", "detokenize", "version"):
            return await router.forward(request, "/" + name)
        return _error(404, f"no route {request.method} /{name} on the router (it forwards /v1/*, /tokenize, "
                           "/detokenize, /version; /health and /metrics are its own)", "not_found")

    return app


async def serve_router(config: RouterConfig) -> None:
    import uvicorn

    router = Router(config)
    await router.start()
    app = build_router_app(router)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False,
                        lifespan="on")
    server = uvicorn.Server(uv)
    t0 = time.monotonic()
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"tokenmill router ({config.policy}) on http://{config.host}:{port} over "
              f"{', '.join(b.url for b in router.set.backends)} (ready in {time.monotonic() - t0:.1f} s)", flush=True)
    await task
