"""The FastAPI app (thin routes over `OpenAIServing`) and `run_server`.

Every client mistake becomes an OpenAI-style error body {"error": {"message", "type", "param", "code"}}
with a 4xx status; engine failures are 500s; the server keeps serving either way.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import ipaddress
import logging
import signal
import time
from typing import Any, AsyncIterator, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.config import EngineConfig
from tokenmill.engine.protocol import EngineClient
from tokenmill.errors import EngineDeadError, TokenmillError
from tokenmill.loop import run as run_loop
from tokenmill.server import protocol as P
from tokenmill.server.config import ServerConfig
from tokenmill.server.guards import GuardMiddleware, header_timeout_protocol
from tokenmill.server.lora_routes import LoRAIds, adapter_registrar, add_lora_routes, model_cards
from tokenmill.server.messages import CountTokensRequest, MessagesRequest, MessagesServing
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.responses import ResponsesRequest, ResponsesServing
from tokenmill.server.serving import EngineRequestError, OpenAIServing, error_body

logger = logging.getLogger("tokenmill.server")

_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/version",
           "/metrics", "/", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/v1/files",
           "/v1/fine_tuning/jobs")
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


def engine_lora_updates(engine: Any) -> bool:
    cfg = getattr(engine, "config", None)
    return bool(cfg is not None and cfg.lora.enable_lora and cfg.lora.enable_lora_runtime_updates)


def build_app(engine: EngineClient, config: ServerConfig, owns_engine: bool = False,
              register_adapter: Optional[Any] = None) -> FastAPI:
    """The HTTP app over `engine`. With owns_engine, app shutdown also shuts the engine down.
    register_adapter(name, path): makes a finished fine-tuning job's PEFT folder servable (default: the engine's
    add_lora when it serves adapters, --enable-lora; without it the adapter is saved only)."""
    config.validate()
    model_name = config.served_model_name or engine.model_name
    metrics = ServerMetrics(engine.get_stats)
    serving = OpenAIServing(engine, model_name, metrics, config.request_timeout_s, config.stream_stall_timeout_s,
                            config.max_tokens_default, config.tool_call_parser)
    health = _Health(engine, serving, config.watchdog_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_engine:
            await engine.shutdown(grace_s=0.0)
        if getattr(app.state, "finetune", None) is not None:
            app.state.finetune.close()

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
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = 400 if exc.status_code == 422 else exc.status_code
        message = str(exc.detail)
        if status == 404 and message == "Not Found":
            message = (f"no route {request.method} {request.url.path} on this server (routes: "
                       f"{', '.join(r for r in _ROUTES if r != '/')}; /docs lists them)")
        elif status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error_response(status, message, headers=getattr(exc, "headers", None))

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

    responses = ResponsesServing(serving, int(config.responses_store_mib * (1 << 20)))
    app.state.responses = responses

    @app.post("/v1/responses", responses=errors)
    async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
        return await responses.create(request, raw_request)

    @app.get("/v1/responses/{response_id}", responses=errors)
    async def get_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.get(response_id))

    @app.delete("/v1/responses/{response_id}", responses=errors)
    async def delete_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.delete(response_id))

    messages = MessagesServing(serving)

    def body_schema(model: Any) -> dict[str, Any]:  # these routes parse their own body (Anthropic's errors)
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": model.model_json_schema()}}}}

    @app.post("/v1/messages", responses=errors, openapi_extra=body_schema(MessagesRequest))
    async def anthropic_messages(raw_request: Request) -> Response:
        """Anthropic's Messages API (errors in Anthropic's shape)."""
        return await messages.create(raw_request)

    @app.post("/v1/messages/count_tokens", responses=errors, openapi_extra=body_schema(CountTokensRequest))
    async def anthropic_count_tokens(raw_request: Request) -> Response:
        return await messages.count_tokens(raw_request)

    @app.get("/v1/models", response_model=P.ModelList, responses={401: {"model": P.ErrorResponse}})
    async def models() -> P.ModelList:
        return P.ModelList(data=model_cards(engine, model_name))

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=errors)
    async def model_card(model_id: str) -> P.ModelCard:
        serving.check_model(model_id)
        cards = model_cards(engine, model_name)
        return next((c for c in cards if c.id == model_id), cards[0])  # cards[0]: the base (its engine name)

    lora_ids = LoRAIds(engine)
    add_lora_routes(app, engine, model_name, errors, engine_lora_updates(engine), lora_ids)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=errors)
    async def tokenize(request: P.TokenizeRequest) -> P.TokenizeResponse:
        return await serving.tokenize(request)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=errors)
    async def detokenize(request: P.DetokenizeRequest) -> P.DetokenizeResponse:
        return await serving.detokenize(request)

    @app.get("/health", responses={503: {"model": P.ErrorResponse}})
    async def health_route() -> Response:
        ok, why = health.check()
        if ok:
            return JSONResponse({"status": "ok"})
        return _error_response(503, why, "service_unavailable", None, "unhealthy")

    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        return Response(status_code=200 if health.check()[0] else 503)

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

    _add_finetune(app, engine, config, model_name, register_adapter or adapter_registrar(engine, lora_ids))
    app.add_middleware(GuardMiddleware, config=config, metrics=metrics, routes=_ROUTES)
    return app


def _add_finetune(app: FastAPI, engine: EngineClient, config: ServerConfig, model_name: str,
                  register_adapter: Optional[Any]) -> None:
    """OpenAI's files and fine-tuning routes (tokenmill/server/finetune_routes.py)."""
    from tokenmill.finetune.service import FineTuneService
    from tokenmill.server.finetune_routes import add_finetune_routes

    app.state.finetune = FineTuneService(engine, config.finetune_dir, model_name, register_adapter)
    add_finetune_routes(app, app.state.finetune)


def startup_lines(host: str, port: int, model_name: str, api_key: Optional[str]) -> list[str]:
    """What `tokenmill serve` prints once it listens: the address, and a warning when it listens beyond
    this machine without an API key."""
    shown = f"[{host}]" if ":" in host else host
    lines = [f"tokenmill serving {model_name} on http://{shown}:{port}"]
    if api_key is None and not _is_loopback(host):
        lines.append(f"WARNING: listening on {host} without --api-key: anyone who can reach this port can use "
                     "the server (pass --api-key, or bind to 127.0.0.1)")
    return lines


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Build the engine, serve until SIGINT/SIGTERM, then drain: stop accepting, let in-flight requests
    finish for up to shutdown_grace_s, abort the rest (HTTP 503 / an SSE error event), shut the engine
    down, and return 0 (the process exits 0). If the engine dies, in-flight requests get their error, the
    server stops and 1 is returned."""
    server_config.validate()
    engine = await asyncio.to_thread(_engine_class(server_config).from_config, engine_config)
    engine_died = False
    started = engine.start()
    if asyncio.iscoroutine(started):
        await started
    try:
        app = build_app(engine, server_config, owns_engine=True)
        # uvicorn stops accepting on SIGTERM; draining ends the in-flight requests within the grace
        # period, so uvicorn's own (longer) timeout only backs it up
        uv = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, lifespan="on", access_log=False,
                            http=header_timeout_protocol(server_config.read_timeout_s),
                            timeout_graceful_shutdown=server_config.shutdown_grace_s + 5.0)
        server = _Server(uv)

        async def announce_and_drain() -> None:
            while not server.started and not server.should_exit:
                await asyncio.sleep(0.05)
            if server.started:
                name = server_config.served_model_name or engine.model_name
                for line in startup_lines(server_config.host, _bound_port(server, server_config.port), name,
                                          server_config.api_key):
                    print(line, flush=True)
            nonlocal engine_died
            while not server.should_exit:
                await asyncio.sleep(0.1)
                if not engine.is_alive and not engine_died:  # requests already got their error events
                    engine_died = True
                    print("tokenmill: the engine has stopped; shutting the server down", flush=True)
                    server.should_exit = True
            await app.state.serving.drain(server_config.shutdown_grace_s)

        drainer = asyncio.create_task(announce_and_drain())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, server.handle_exit, sig, None)
        try:
            await server.serve()
        finally:
            drainer.cancel()
    finally:
        if engine.is_alive:
            await engine.shutdown(grace_s=0.0)
    return 1 if engine_died else 0


def _engine_class(server_config: ServerConfig) -> Any:
    """The EngineClient: the engine core in its own process (default) or on a thread of this one."""
    if server_config.data_parallel_size > 1:
        import functools
        import types

        from tokenmill.router.dp_client import DataParallelClient

        return types.SimpleNamespace(from_config=functools.partial(
            DataParallelClient.from_config, size=server_config.data_parallel_size,
            policy=server_config.data_parallel_policy))
    if server_config.engine_process:
        from tokenmill.engine.core_client import EngineProcClient

        return EngineProcClient
    from tokenmill.engine.async_engine import AsyncEngine

    return AsyncEngine


class _Server(uvicorn.Server):
    """uvicorn's Server without its signal capture: uvicorn re-raises a captured SIGTERM after shutting
    down, which would kill the process (exit -15) after a clean drain; `serve` installs its own handlers."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def _bound_port(server: Any, default: int) -> int:
    try:
        return int(server.servers[0].sockets[0].getsockname()[1])
    except (AttributeError, IndexError, TypeError):
        return default


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """`tokenmill serve`: blocks until the server has shut down; exits 1 if the engine died."""
    if run_loop(serve(engine_config, server_config)):
        raise SystemExit(1)
