"""Pydantic models of the OpenAI HTTP API (chat completions, completions, models, errors) plus vLLM extras.

Requests validate their own types and ranges (a violation is an HTTP 400) and map themselves to
`SamplingParams` with `to_sampling_params()`.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SLO, SamplingParams, StructuredOutputsParams
from tokenmill.server.constraints import constraint_from_fields

# OpenAI fields this server cannot honour: a 400 naming them, never silently dropped
UNSUPPORTED = {
    "audio": "audio output is not supported: this server serves a text-only model",
    "prediction": "predicted outputs (`prediction`) are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the legacy `functions` field is not supported: use `tools`",
    "function_call": "the legacy `function_call` field is not supported: use `tool_choice`",
}

MAX_N = 128
MAX_TOP_LOGPROBS = 20
INT32_MAX = 2 ** 31 - 1


class OpenAIModel(BaseModel):
    # Infinity / NaN (which Python's JSON parser accepts) are a 400 in every float field
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------- errors


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------ shared parts


class StreamOptions(OpenAIModel):
    include_usage: Optional[bool] = False


class SLOSpec(OpenAIModel):
    ttft_ms: Optional[float] = Field(None, gt=0)
    tpot_ms: Optional[float] = Field(None, gt=0)


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SamplingFields(OpenAIModel):
    """Fields both endpoints share (OpenAI + vLLM extras). Unknown fields are kept (`model_extra`): the
    server refuses those it cannot honour (UNSUPPORTED) and logs the others once."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = Field(None, ge=-1, le=INT32_MAX)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[StrictInt]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=-INT32_MAX - 1, le=INT32_MAX)
    slo: Optional[SLOSpec] = None
    cache_salt: Optional[str] = None
    kv_eviction: Optional[Literal["streaming"]] = None  # tokenmill extra: StreamingLLM sinks + window
    # output constraints (one at most): OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None
    # disaggregated prefill / decode (vLLM's name; tokenmill/disagg): the proxy's handshake
    kv_transfer_params: Optional[dict[str, Any]] = None

    def constraint(self) -> tuple[Optional[StructuredOutputsParams], Optional[str]]:
        """The request's output constraint and the field it came from (InvalidRequestError when bad)."""
        return constraint_from_fields({k: getattr(self, k) for k in (
            "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
            "structured_outputs")})

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if v is None:
            return v
        for key, val in v.items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            if not -100.0 <= val <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {val}")
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings are allowed")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: Optional[int], logprobs: Optional[int],
                prompt_logprobs: Optional[int] = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None
        slo = SLO(ttft_ms=self.slo.ttft_ms, tpot_ms=self.slo.tpot_ms) if self.slo else None
        seed = self.seed
        if seed is not None and seed < 0:
            seed &= 2 ** 64 - 1
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=bias,
            seed=seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            priority=self.priority,
            slo=slo,
            user=self.user,
            cache_salt=self.cache_salt,
            kv_eviction=self.kv_eviction,
            structured_outputs=self.constraint()[0],
            kv_transfer_params=self.kv_transfer_params,
        )


# ------------------------------------------------------------------------------------ chat completions


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; content is text or a list of text parts. Extra keys (tool_calls, ...) reach the template."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None

    def to_template_dict(self) -> dict[str, Any]:
        """The message as the processor takes it: text parts stay a list (the processor joins them with
        newlines); a missing content stays missing (only an assistant turn with tool_calls may omit it)."""
        return self.model_dump(exclude_none=True)


class FunctionDef(OpenAIModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ToolDef(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # vLLM extra

    def to_sampling_params(self) -> SamplingParams:
        """max_completion_tokens wins over the deprecated max_tokens; None = up to the context limit."""
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        if self.continue_final_message and (not self.messages or self.messages[-1].role != "assistant"):
            raise InvalidRequestError("continue_final_message needs an assistant message last",
                                      param="continue_final_message")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max_tokens, logprobs, self.prompt_logprobs)


class ChatLogprobTop(OpenAIModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogprobToken(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: Optional[list[ChatLogprobToken]] = None


class ChatResponseMessage(OpenAIModel):
    role: str = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None
    prompt_logprobs: Optional[list[Optional[dict[str, Any]]]] = None  # vLLM's shape: token id -> logprob
    kv_transfer_params: Optional[dict[str, Any]] = None  # a prefill instance's answer (tokenmill/disagg)


class DeltaMessage(OpenAIModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------------------- completions

PromptType = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: PromptType) -> PromptType:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("token-id prompts must not be empty")
            if any(isinstance(t, int) and t < 0 for t in v):
                raise ValueError("token ids must be non-negative")
            if any(isinstance(p, list) and any(t < 0 for t in p) for p in v):
                raise ValueError("token ids must be non-negative")
        return v

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch of prompts: one string or one token-id list per entry."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        """max_tokens=0 is allowed only with echo (prompt scoring); the engine then runs 1 token we drop."""
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported (use n)", param="best_of")
        max_tokens = self.max_tokens
        if max_tokens == 0:
            if not self.echo:
                raise InvalidRequestError("max_tokens must be at least 1 (0 is allowed only with echo)",
                                          param="max_tokens")
            max_tokens = 1
        prompt_logprobs = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._params(max_tokens, self.logprobs, prompt_logprobs)


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None
    kv_transfer_params: Optional[dict[str, Any]] = None  # a prefill instance's answer (tokenmill/disagg)


class CompletionChunk(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------------------------------------- models


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    max_model_len: Optional[int] = None
    root: Optional[str] = None  # a LoRA adapter: its folder
    parent: Optional[str] = None  # a LoRA adapter: the base model's id


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(OpenAIModel):
    version: str


# ------------------------------------------------------------------------------- tokenize / detokenize (vLLM)


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a text prompt, or chat `messages` rendered with the chat template."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    tokens: list[StrictInt]


class DetokenizeResponse(OpenAIModel):
    prompt: str
