"""`tokenmill disagg-proxy --prefill URL --decode URL`: one OpenAI endpoint over a prefill instance (--kv-role
producer) and a decode instance (--kv-role consumer).

Each /v1/completions or /v1/chat/completions request goes first to the prefill instance with max_tokens 1,
unstreamed, and kv_transfer_params {"do_remote_decode": true, "transfer_id": T}: it runs the prompt, samples
the first token and holds the prompt's KV blocks for the decode side. Its answer's kv_transfer_params (the
producer's KV address and the first token) go with the original request to the decode instance, which
reports the first token at once, pulls the KV and continues; its answer (or stream) is returned as it comes,
so the client sees one ordinary response whose first token was sampled by the prefill instance. A client that
disconnects from a stream closes the decode stream, which aborts the request there. Any other route (models,
tokenize, ...) is answered by the decode instance. The pairing lives here, apart from any router, so a router
can later pick the pair.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import uuid
from typing import Any, Optional
from urllib.parse import urlparse

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tokenmill.disagg.params import prefill_request_body, split_request_error

logger = logging.getLogger(__name__)


def check_url(name: str, url: str) -> str:
    """A backend's base URL (http[s]://host:port, no trailing slash); ValueError naming the flag when bad."""
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ValueError(f"--{name} must be an http:// or https:// URL with a host, got {url!r}")
    try:
        p.port
    except ValueError:
        raise ValueError(f"--{name} has a bad port: {url!r}") from None
    return url.rstrip("/")


def _error(status: int, message: str, param: Optional[str] = None, type_: str = "invalid_request_error") -> Response:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


def _passthrough(r: httpx.Response) -> Response:
    return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))


class DisaggProxy:
    def __init__(self, prefill_url: str, decode_url: str, timeout_s: float = 600.0):
        self.prefill = check_url("prefill", prefill_url)
        self.decode = check_url("decode", decode_url)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.num_requests = 0
        self.num_prefill_errors = 0

    async def close(self) -> None:
        await self.client.aclose()

    async def generate(self, path: str, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return _error(400, f"the body is not valid JSON: {e}")
        bad = split_request_error(body)
        if bad is not None:
            return _error(400, bad[0], bad[1])
        self.num_requests += 1
        transfer_id = f"disagg-{uuid.uuid4().hex}"
        try:
            r = await self.client.post(self.prefill + path, json=prefill_request_body(body, transfer_id))
        except httpx.HTTPError as e:
            self.num_prefill_errors += 1
            return _error(502, f"the prefill instance failed: {type(e).__name__}: {e}", type_="server_error")
        if r.status_code != 200:
            return _passthrough(r)  # the prefill instance's own error (a bad request is a bad request there too)
        kv = r.json().get("kv_transfer_params")
        if not isinstance(kv, dict):
            return _error(502, "the prefill instance answered without kv_transfer_params: is it started with "
                               "--kv-role producer?", type_="server_error")
        dbody = dict(body, kv_transfer_params=kv)
        try:
            if not body.get("stream"):
                return _passthrough(await self.client.post(self.decode + path, json=dbody))
            up = await self.client.send(self.client.build_request("POST", self.decode + path, json=dbody),
                                        stream=True)
        except httpx.HTTPError as e:
            return _error(502, f"the decode instance failed: {type(e).__name__}: {e}", type_="server_error")
        if up.status_code != 200:
            await up.aread()
            await up.aclose()
            return _passthrough(up)
        # closing the upstream stream (client gone or done) aborts the request on the decode instance
        return StreamingResponse(up.aiter_bytes(), status_code=200, media_type=up.headers.get("content-type"),
                                 background=BackgroundTask(up.aclose))

    async def forward(self, request: Request) -> Response:
        """Anything else goes to the decode instance (models, tokenize, version, ...)."""
        try:
            r = await self.client.request(request.method, self.decode + request.url.path,
                                          params=request.query_params, content=await request.body(),
                                          headers={"content-type": request.headers.get("content-type", "")})
        except httpx.HTTPError as e:
            return _error(502, f"the decode instance failed: {type(e).__name__}: {e}", type_="server_error")
        return _passthrough(r)

    async def health(self) -> Response:
        bad = []
        for name, url in (("prefill", self.prefill), ("decode", self.decode)):
            try:
                if (await self.client.get(url + "/health", timeout=5.0)).status_code != 200:
                    bad.append(name)
            except httpx.HTTPError:
                bad.append(name)
        if bad:
            return _error(503, f"unhealthy: {', '.join(bad)}", type_="server_error")
        return Response(status_code=200)


def build_app(proxy: DisaggProxy) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await proxy.close()

    app = FastAPI(title="tokenmill disagg-proxy", lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy.generate("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy.generate("/v1/chat/completions", request)

    @app.get("/health")
    async def health() -> Response:
        return await proxy.health()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def other(request: Request) -> Response:
        return await proxy.forward(request)

    return app


def add_proxy_args(sub: Any) -> None:
    p = sub.add_parser("disagg-proxy", help="one OpenAI endpoint over a prefill (--kv-role producer) and a decode "
                                            "(--kv-role consumer) instance")
    p.add_argument("--prefill", required=True, help="base URL of the prefill instance, e.g. http://127.0.0.1:8100")
    p.add_argument("--decode", required=True, help="base URL of the decode instance, e.g. http://127.0.0.1:8200")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--timeout-s", type=float, default=600.0, help="longest wait on either instance")
    p.set_defaults(func=cmd_proxy)


def cmd_proxy(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.errors import ConfigError

    try:
        proxy = DisaggProxy(args.prefill, args.decode, args.timeout_s)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    uvicorn.run(build_app(proxy), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
