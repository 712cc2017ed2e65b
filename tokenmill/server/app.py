"""The FastAPI app (thin routes over `OpenAIServing`) and `run_server`.

Every client mistake becomes an OpenAI-style error body {"error": {"message", "type", "param", "code"}}
with a 4xx status; engine failures are 500s; the server keeps serving either way.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.config import EngineConfig
from tokenmill.engine.protocol import EngineClient
from tokenmill.errors import EngineDeadError, TokenmillError
from tokenmill.server import protocol as P
from tokenmill.server.config import ServerConfig
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.serving import EngineRequestError, OpenAIServing, error_body

logger = logging.getLogger("tokenmill.server")

_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version", "/metrics", "/")
_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error"}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tokenmill")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.1.0"


def _error_response(status: int, message: str, err_type: Optional[str] = None, param: Optional[str] = None,
                    code: Optional[Any] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    err_type = err_type or _STATUS_TYPES.get(status, "internal_server_error" if status >= 500 else "error")
    return JSONResponse(error_body(message, err_type, param, code), status_code=status, headers=headers)


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class _GuardMiddleware:
    """Bearer auth on /v1, request-body size limit (413), and response counting, before any routing."""

    def __init__(self, app: ASGIApp, config: ServerConfig, metrics: ServerMetrics):
        self.app = app
        self.key = config.api_key.encode() if config.api_key else None
        self.limit = config.max_request_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = path if path in _ROUTES else "other"
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
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await _send_json(send, 401, error_body("invalid or missing API key (use Authorization: Bearer "
                                                       "<key>)", "authentication_error", None, "invalid_api_key"),
                                 ((b"www-authenticate", b"Bearer"),))
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
        while True:
            message = await receive()
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


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


class _Health:
    """/health: the engine is alive and, while requests are pending, its loop keeps completing steps."""

    def __init__(self, engine: EngineClient, serving: OpenAIServing, watchdog_s: float):
        self.engine, self.serving, self.watchdog_s = engine, serving, watchdog_s

    def check(self) -> tuple[bool, str]:
        try:
            alive = bool(self.engine.is_alive)
            stats = self.engine.get_stats()
        except Exception as e:  # noqa: BLE001 - a broken engine is unhealthy, not a crash
            return False, f"engine stats unavailable: {e}"
        if not alive or not stats.loop_alive:
            return False, "engine loop is dead"
        if stats.num_running + stats.num_waiting > 0:
            last = max(stats.last_step_time, self.serving.busy_since)
            stalled = time.monotonic() - last
            if stalled > self.watchdog_s:
                return False, f"engine loop stuck: no step completed for {stalled:.1f} s"
        return True, "ok"


def build_app(engine: EngineClient, config: ServerConfig, owns_engine: bool = False) -> FastAPI:
    """The HTTP app over `engine`. With owns_engine, app shutdown also shuts the engine down."""
    config.validate()
    model_name = config.served_model_name or engine.model_name
    metrics = ServerMetrics(engine.get_stats)
    serving = OpenAIServing(engine, model_name, metrics, config.request_timeout_s)
    health = _Health(engine, serving, config.watchdog_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_engine:
            await engine.shutdown(grace_s=0.0)

    app = FastAPI(title="tokenmill", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API of the tokenmill inference engine")
    app.state.serving, app.state.metrics, app.state.config = serving, metrics, config
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": P.ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 500)}

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = 400 if exc.status_code == 422 else exc.status_code
        return _error_response(status, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(TokenmillError)
    async def _on_tokenmill(_: Request, exc: TokenmillError) -> JSONResponse:
        headers = {"Retry-After": str(config.retry_after_s)} if exc.http_status == 429 else None
        return _error_response(exc.http_status, exc.message, exc.error_type, exc.param, exc.code, headers)

    @app.exception_handler(EngineRequestError)
    async def _on_engine(_: Request, exc: EngineRequestError) -> JSONResponse:
        return _error_response(500, str(exc), "internal_server_error", None, "engine_error")

    @app.exception_handler(EngineDeadError)
    async def _on_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error_response(503, f"the engine is not running: {exc}", "service_unavailable", None,
                               "engine_dead")

    @app.exception_handler(Exception)
    async def _on_other(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(500, f"internal error: {type(exc).__name__}", "internal_server_error")

    @app.post("/v1/chat/completions", responses=errors,
              response_model=P.ChatCompletionResponse | P.ChatCompletionChunk)
    async def chat_completions(request: P.ChatCompletionRequest, raw_request: Request) -> Response:
        return await serving.chat(request, raw_request)

    @app.post("/v1/completions", responses=errors, response_model=P.CompletionResponse | P.CompletionChunk)
    async def completions(request: P.CompletionRequest, raw_request: Request) -> Response:
        return await serving.completion(request, raw_request)

    @app.get("/v1/models", response_model=P.ModelList, responses={401: {"model": P.ErrorResponse}})
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=model_name, max_model_len=engine.max_model_len)])

    @app.get("/health", responses={503: {"model": P.ErrorResponse}})
    async def health_route() -> Response:
        ok, why = health.check()
        if ok:
            return JSONResponse({"status": "ok"})
        return _error_response(503, why, "service_unavailable", None, "unhealthy")

    @app.get("/version", response_model=P.VersionResponse)
    async def version() -> P.VersionResponse:
        return P.VersionResponse(version=_version())

    @app.get("/metrics", response_class=Response)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = importlib.resources.files("tokenmill.server").joinpath("web/index.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(_GuardMiddleware, config=config, metrics=metrics)
    return app


async def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Build the engine, serve until SIGINT/SIGTERM, then drain: stop accepting, let in-flight requests
    finish for up to shutdown_grace_s, abort the rest, shut the engine down."""
    import uvicorn

    from tokenmill.engine.async_engine import AsyncEngine

    server_config.validate()
    engine = await asyncio.to_thread(AsyncEngine.from_config, engine_config)
    started = engine.start()
    if asyncio.iscoroutine(started):
        await started
    try:
        app = build_app(engine, server_config, owns_engine=True)
        # uvicorn stops accepting on SIGTERM; draining ends the in-flight requests within the grace
        # period, so uvicorn's own (longer) timeout only backs it up
        uv = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, lifespan="on", access_log=False,
                            timeout_graceful_shutdown=server_config.shutdown_grace_s + 5.0)
        server = uvicorn.Server(uv)

        async def drain_on_exit() -> None:
            while not server.should_exit:
                await asyncio.sleep(0.1)
            await app.state.serving.drain(server_config.shutdown_grace_s)

        drainer = asyncio.create_task(drain_on_exit())
        try:
            await server.serve()
        finally:
            drainer.cancel()
    finally:
        if engine.is_alive:
            await engine.shutdown(grace_s=0.0)


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """`tokenmill serve`: blocks until the server has shut down."""
    asyncio.run(serve(engine_config, server_config))
