"""SamplingParams: how one request picks its tokens (vLLM-compatible names)."""
from __future__ import annotations

import enum
import json as _json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from tokenmill.errors import InvalidRequestError

_EPS = 1e-5
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a stream holds (vLLM's names).

    CUMULATIVE: everything so far (text, token ids, logprobs) plus the delta_* fields of this update.
    DELTA: only what is new since the previous output (text, token_ids and logprobs are the delta).
    FINAL_ONLY: a single output, when the request has finished, with everything.
    A slow consumer of DELTA outputs gets the pending ones merged into one (memory stays linear in the
    output length)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SLO:
    """Per-request latency targets in milliseconds (None = no target)."""

    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None


@dataclass
class StructuredOutputsParams:
    """Constrained decoding (vLLM's names): exactly one of
    `json` (a JSON schema, as a dict or a JSON string), `regex`, `choice` (the output is one of these strings),
    `grammar` (EBNF, xgrammar's dialect: `root ::= ...`) or `json_object=True` (any JSON object).
    `disable_any_whitespace`: JSON without free whitespace between tokens (compact output; small models can
    otherwise emit runs of newlines). The grammar itself is built and compiled by tokenmill/structured
    (xgrammar), where a schema, regex or grammar that does not compile is an InvalidRequestError naming
    `structured_outputs.<field>`."""

    json: Optional[Union[dict, str]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        given = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object; got "
                + (", ".join(given) if given else "none"), param="structured_outputs")
        if self.json is not None:
            spec = self.json
            if isinstance(spec, str):
                try:
                    spec = _json.loads(spec)
                except ValueError as e:
                    raise InvalidRequestError(f"structured_outputs.json is not valid JSON: {e}",
                                              param="structured_outputs.json") from None
            if not isinstance(spec, (dict, bool)):
                raise InvalidRequestError("structured_outputs.json must be a JSON schema (an object), got "
                                          f"{type(spec).__name__}", param="structured_outputs.json")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"structured_outputs.{name} must be a non-empty string",
                                          param=f"structured_outputs.{name}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise InvalidRequestError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                          param="structured_outputs.choice")
            self.choice = list(self.choice)
        if not isinstance(self.json_object, bool) or not isinstance(self.disable_any_whitespace, bool):
            raise InvalidRequestError("structured_outputs.json_object and disable_any_whitespace must be booleans",
                                      param="structured_outputs")

    @property
    def kind(self) -> str:
        """Which constraint: json, regex, choice, grammar or json_object."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as one string (a schema re-serialized compactly; key order is kept, since it is the
        order of the output's properties): with `kind`, the grammar's key."""
        kind = self.kind
        if kind == "json":
            value: Any = _json.loads(self.json) if isinstance(self.json, str) else self.json
            return _json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if kind == "choice":
            return _json.dumps(self.choice, ensure_ascii=False)
        if kind == "json_object":
            return ""
        return getattr(self, kind)

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, spec, disable_any_whitespace): what the compiled-grammar cache is keyed by."""
        return self.kind, self.spec, self.disable_any_whitespace


@dataclass
class SamplingParams:
    """Sampling settings of one request.

    temperature 0 means greedy (argmax). top_k <= 0 (or -1) disables top-k. Penalties follow the
    OpenAI (presence/frequency, additive) and CTRL (repetition, multiplicative) definitions.
    `seed` makes a request's sampled tokens reproducible whatever else is in the batch.
    `logprobs` = number of top logprobs returned per generated token (0 = only the sampled one);
    `prompt_logprobs` likewise for prompt tokens.
    `structured_outputs` constrains the output to a JSON schema, regex, choice or grammar (a dict is taken as
    StructuredOutputsParams' fields).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    # scheduling hints (used by the priority / slo / fairness policies)
    priority: int = 0
    slo: Optional[SLO] = None
    user: Optional[str] = None
    cache_salt: Optional[str] = None
    # long-context KV eviction: None (keep everything) or "streaming" (attention sinks + a recent window,
    # StreamingLLM; sizes in CacheConfig.streaming_*_tokens): bounded memory, endless generation
    kv_eviction: Optional[str] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # constrained decoding (tokenmill/structured): JSON schema, regex, choice or EBNF grammar
    structured_outputs: Optional[StructuredOutputsParams] = None
    # disaggregated prefill / decode (tokenmill/core/kv_transfer.py): do_remote_decode on the prefill instance,
    # do_remote_prefill (+ the producer's address and first token) on the decode instance; checked there
    kv_transfer_params: Optional[dict] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        if isinstance(self.slo, dict):
            self.slo = SLO(**self.slo)
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise InvalidRequestError(f"structured_outputs: {e}", param="structured_outputs") from None
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    def validate(self) -> None:
        def bad(param: str, msg: str) -> None:
            raise InvalidRequestError(msg, param=param)

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"n must be at least 1, got {self.n}")
        if self.n > 128:
            bad("n", f"n must be at most 128, got {self.n}")
        if self.temperature < 0 or self.temperature > 100:
            bad("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int):
            bad("top_k", f"top_k must be an integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        if len(self.stop) > 16:
            bad("stop", "at most 16 stop strings are allowed")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "stop_token_ids must be non-negative integers")
        if self.logit_bias:
            for k, v in self.logit_bias.items():
                if not -100.0 <= float(v) <= 100.0:
                    bad("logit_bias", f"logit_bias values must be in [-100, 100], got {v} for token {k}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"seed must be an integer, got {self.seed!r}")
        if self.kv_eviction not in (None, "streaming"):
            bad("kv_eviction", f"kv_eviction must be null or 'streaming', got {self.kv_eviction!r}")
        if self.slo is not None:
            for name in ("ttft_ms", "tpot_ms"):
                v = getattr(self.slo, name)
                if v is not None and v <= 0:
                    bad(f"slo.{name}", f"slo.{name} must be positive, got {v}")
        if self.kv_transfer_params is not None and self.n != 1:
            bad("n", "kv_transfer_params (disaggregated prefill / decode) needs n = 1")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                bad("structured_outputs", "structured_outputs must be a StructuredOutputsParams or a dict")
            self.structured_outputs.validate()

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks that need the model: token ids in range."""
        if self.logit_bias:
            for k in self.logit_bias:
                if not 0 <= int(k) < vocab_size:
                    raise InvalidRequestError(f"logit_bias token id {k} is out of range [0, {vocab_size})",
                                              param="logit_bias")
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise InvalidRequestError(f"stop_token_ids entry {t} is out of range [0, {vocab_size})",
                                          param="stop_token_ids")

    def clone(self, **changes) -> "SamplingParams":
        import dataclasses

        return dataclasses.replace(self, **changes)
