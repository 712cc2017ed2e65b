"""Multi-LoRA routes: the adapters in /v1/models, and (with --enable-lora-runtime-updates) vLLM's
POST /v1/load_lora_adapter and /v1/unload_lora_adapter. Loading reads the folder in a worker thread, off the
engine's step loop; unloading an adapter with unfinished requests answers 409."""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from tokenmill.errors import InvalidRequestError
from tokenmill.lora.request import LoRARequest
from tokenmill.server import protocol as P
from tokenmill.server.generation import ModelNotFoundError


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: Optional[int] = None  # vLLM's shape; must match the adapter's id when given


def model_cards(engine: Any, model_name: str) -> list[P.ModelCard]:
    """The base model, then each adapter with parent = the base model's id."""
    cards = [P.ModelCard(id=model_name, max_model_len=engine.max_model_len)]
    get = getattr(engine, "lora_requests", None)
    for r in (get() if get is not None else []):
        cards.append(P.ModelCard(id=r.lora_name, max_model_len=engine.max_model_len, root=r.lora_path,
                                 parent=model_name))
    return cards


class LoRAIds:
    """Adapter ids for one server: each fresh, never one handed out before (two loads at once, or an adapter
    unloaded and another loaded, get different ids; 0 is the base model)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.last = 0

    def next(self) -> int:
        self.last = max([self.last, *[r.lora_int_id for r in self.engine.lora_requests()]]) + 1
        return self.last


def adapter_registrar(engine: Any, ids: LoRAIds) -> Optional[Callable[[str, str], Awaitable[bool]]]:
    """register(name, folder) -> awaitable: serves a PEFT folder under `name` (a finished fine-tuning job's
    adapter); None where the engine serves no adapters (started without --enable-lora)."""
    cfg = getattr(engine, "config", None)
    if cfg is None or not cfg.lora.enable_lora:
        return None

    def register(name: str, path: str) -> Awaitable[bool]:
        return engine.add_lora(LoRARequest(name, ids.next(), path))
    return register


def add_lora_routes(app: FastAPI, engine: Any, model_name: str, errors: dict, runtime_updates: bool,
                    ids: LoRAIds) -> None:
    if not runtime_updates:
        return
    errors = {**errors, 409: {"model": P.ErrorResponse}}

    @app.post("/v1/load_lora_adapter", responses=errors, response_class=PlainTextResponse)
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> PlainTextResponse:
        if not request.lora_name or request.lora_name == model_name:
            raise InvalidRequestError(f"lora_name {request.lora_name!r} is empty or the base model's name",
                                      param="lora_name")
        if any(r.lora_name == request.lora_name for r in engine.lora_requests()):
            raise InvalidRequestError(f"the adapter {request.lora_name!r} is already loaded", param="lora_name")
        if not await engine.add_lora(LoRARequest(request.lora_name, ids.next(), request.lora_path)):
            raise InvalidRequestError(f"the adapter {request.lora_name!r} could not be registered", param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", responses=errors, response_class=PlainTextResponse)
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        found = next((r for r in engine.lora_requests() if r.lora_name == request.lora_name), None)
        if found is None or (request.lora_int_id is not None and request.lora_int_id != found.lora_int_id):
            raise ModelNotFoundError(f"no LoRA adapter named {request.lora_name!r} is loaded")
        await engine.remove_lora(found.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")


