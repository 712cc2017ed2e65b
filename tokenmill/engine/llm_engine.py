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

    def add_request(self, request_id: str, prompt: Optional[str], params: SamplingParams,
                    prompt_token_ids: Optional[list[int]] = None, arrival_time: Optional[float] = None,
                    prepared: Optional[tuple[list[int], int]] = None) -> None:
        ids, max_tokens = prepared if prepared is not None else self.prepare(prompt, params, prompt_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = self.output_processor.add_request(request_id, prompt, ids, params, arrival)
        added = []
        try:
            for eid, p in children:
                self.core.add_request(Request(eid, ids, p, self.eos_token_ids, arrival, max_tokens))
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
        outs, stopped = self.output_processor.process(self.core.step())
        if stopped:
            self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outs

    def stats(self) -> EngineStats:
        return self.core.stats()
