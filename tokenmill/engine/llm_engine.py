"""LLMEngine: tokenizer + validation + EngineCore + output processing, driven synchronously.

Both the offline `LLM` facade and the `AsyncEngine` (which runs it on a background thread) use it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.processor import Processor
from tokenmill.engine.protocol import EngineStats
from tokenmill.engine.tokenizer import eos_token_ids, load_tokenizer
from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.outputs import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class _NoTokenizer:
    """Stands in for the tokenizer with skip_tokenizer_init: text prompts are refused, outputs decode to ""."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise InvalidRequestError("the engine runs with skip_tokenizer_init: give prompts as token ids",
                                  param="prompt")

    def decode(self, ids, **kwargs) -> str:
        return ""


class LLMEngine:
    def __init__(self, config: EngineConfig, core=None):
        """core: the EngineCore by default; the engine-process client passes its stand-in (core_client.py)."""
        config.validate()
        self.config = config
        self.core = core if core is not None else EngineCore(config)
        self.tokenizer = None
        self.processor: Optional[Processor] = None
        self.output_processor: Optional[OutputProcessor] = None
        self.eos_token_ids: tuple[int, ...] = ()
        self.model_name = config.model.served_model_name or DEFAULT_MODEL_NAME
        self.lora_requests: dict = {}  # lora_int_id -> LoRARequest of the adapters registered (enable_lora)
        self.lora_shapes = None  # what adapters may target (the load handshake)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        engine = cls(config)
        engine.load()
        return engine

    def load(self) -> None:
        info = self.core.load()
        self._init_frontend(info)

    def _init_frontend(self, info) -> None:
        """Tokenizer, validation and detokenization from the executor's handshake (tokenmill.executor.ModelInfo);
        the engine-process client (engine/core_client.py) runs this half in the API process."""
        if self.config.model.skip_tokenizer_init:  # like vLLM: token-id prompts only, outputs without text
            self.tokenizer = None
        elif self.config.model.tokenizer:
            self.tokenizer = load_tokenizer(self.config.model.tokenizer)
        else:
            try:
                self.tokenizer = load_tokenizer(info.model_path, info.gguf_file)
            except ModelLoadError as e:
                raise ModelLoadError(f"{e.message.splitlines()[0]} (pass tokenizer=<folder>, or "
                                     "skip_tokenizer_init=True to run on token ids)") from None
        self.eos_token_ids = eos_token_ids(self.tokenizer, {"eos_token_id": list(info.eos_token_ids)})
        text_tokenizer = self.tokenizer if self.tokenizer is not None else _NoTokenizer()
        self.processor = Processor(text_tokenizer, info.max_model_len, info.vocab_size,
                                   streaming_max_prompt=self.core.streaming_max_prompt_tokens())
        self.output_processor = OutputProcessor(text_tokenizer)
        if self.tokenizer is not None:  # constrained decoding needs the vocabulary's strings
            self.core.init_structured_outputs(self.tokenizer, info.vocab_size, self.eos_token_ids)
        self.lora_shapes = getattr(info, "lora_shapes", None)
        if self.config.lora.enable_lora:  # --lora-modules: the engine core registered them as ids 1..n at load
            from tokenmill.lora.request import LoRARequest

            for i, (name, path) in enumerate(self.config.lora.parsed_modules(), start=1):
                self.lora_requests[i] = LoRARequest(name, i, path)
        if not self.config.model.served_model_name and self.config.model.model:
            name = os.path.basename(os.path.normpath(self.config.model.model))
            self.model_name = name[:-5] if name.endswith(".gguf") else name

    def shutdown(self) -> None:
        self.core.shutdown()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    # ---- requests ------------------------------------------------------------------------------
    def prepare(self, prompt: Optional[str], params: SamplingParams,
                prompt_token_ids: Optional[list[int]] = None) -> tuple[list[int], int]:
        """Tokenize and validate; returns (prompt ids, effective max_tokens). Raises on bad input."""
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequestError("either a prompt or prompt token ids must be given", param="prompt")
            if not isinstance(prompt, str):
                raise InvalidRequestError("the prompt must be a string or a list of token ids", param="prompt")
            prompt_token_ids = self.processor.tokenize(prompt)
        ids = list(prompt_token_ids)
        max_tokens = self.processor.validate(ids, params)
        if params.structured_outputs is not None:
            if self.core.structured is None:
                raise InvalidRequestError("structured_outputs needs the tokenizer; the engine runs with "
                                          "skip_tokenizer_init", param="structured_outputs")
            self.core.structured.manager.validate(params.structured_outputs)  # parses; compiling starts
        return ids, max_tokens

    # ---- LoRA adapters (enable_lora) ----------------------------------------------------------------
    def read_lora(self, req):
        """Read and check a LoRARequest's PEFT folder (the slow half of add_lora; safe off the step thread)."""
        from tokenmill.lora.adapter import read_adapter

        if not self.config.lora.enable_lora:
            raise InvalidRequestError("LoRA adapters need enable_lora (--enable-lora)", param="lora_name")
        if req.lora_name == self.model_name:
            raise InvalidRequestError(f"{req.lora_name!r} is the base model's name", param="lora_name")
        other = self.lora_by_name(req.lora_name)
        if other is not None and other.lora_int_id != req.lora_int_id:
            raise InvalidRequestError(f"an adapter named {req.lora_name!r} is already loaded", param="lora_name")
        return read_adapter(req.lora_name, req.lora_path, self.lora_shapes, self.config.lora.max_lora_rank)

    def register_lora(self, req, weights) -> bool:
        """Register an adapter read by read_lora (on the thread that steps the engine); False if its id is taken."""
        if not self.core.add_lora(req.lora_int_id, req.lora_name, req.lora_path, weights):
            return False
        self.lora_requests[req.lora_int_id] = req
        return True

    def add_lora(self, req) -> bool:
        """Load a LoRARequest's adapter; False if an adapter with its id is already loaded."""
        if req.lora_int_id in self.lora_requests:
            return False
        return self.register_lora(req, self.read_lora(req))

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unload an adapter; tokenmill.lora.registry.LoRAInUseError while it has unfinished requests."""
        if lora_int_id not in self.lora_requests:
            return False
        self.core.remove_lora(lora_int_id)
        del self.lora_requests[lora_int_id]
        return True

    def list_loras(self) -> set[int]:
        return set(self.lora_requests)

    def lora_by_name(self, name: str):
        return next((r for r in self.lora_requests.values() if r.lora_name == name), None)

    def add_request(self, request_id: str, prompt: Optional[str], params: SamplingParams,
                    prompt_token_ids: Optional[list[int]] = None, arrival_time: Optional[float] = None,
                    prepared: Optional[tuple[list[int], int]] = None, lora_request=None) -> None:
        lora_id = 0
        if lora_request is not None:
            lora_id = lora_request.lora_int_id
            if self.lora_requests.get(lora_id) != lora_request:
                raise InvalidRequestError(f"LoRA adapter {lora_request.lora_name!r} (id {lora_id}) is not loaded",
                                          param="model")
        ids, max_tokens = prepared if prepared is not None else self.prepare(prompt, params, prompt_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = self.output_processor.add_request(request_id, prompt, ids, params, arrival)
        added = []
        try:
            for eid, p in children:
                self.core.add_request(Request(eid, ids, p, self.eos_token_ids, arrival, max_tokens,
                                              lora_int_id=lora_id))
                added.append(eid)
        except Exception:
            self.output_processor.abort(request_id)
            self.core.abort_requests(added)
            raise

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_work()

    def step(self) -> list[RequestOutput]:
        return self._process(self.core.step())

    def ready_outputs(self) -> list[RequestOutput]:
        """What the core knows without a step (EngineCore.take_ready_outputs): the first token of a request whose
        prompt ran on a prefill instance, reported when it is added rather than after the next step."""
        return self._process(self.core.take_ready_outputs())

    def _process(self, core_outputs: list) -> list[RequestOutput]:
        outs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outs

    def stats(self) -> EngineStats:
        return self.core.stats()
