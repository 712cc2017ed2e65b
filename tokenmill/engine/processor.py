"""Turns user input into validated prompt token ids: chat template, tokenization, length checks."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.sampling_params import SamplingParams

_ROLES_NEEDING_NO_CONTENT = ("assistant",)  # an assistant turn may carry only tool_calls


def _bad(message: str, param: str = "messages") -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _check_unicode(text: str, param: str) -> None:
    """A lone surrogate ("\\ud800", which JSON can carry) cannot be encoded: a clear 400, not a crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{param} is not valid Unicode (it contains a lone surrogate such as \\ud800)", param) from None


def _normalize_content(content: Any, index: int) -> Any:
    """OpenAI content: a string, None, or a list of parts; text parts are joined with newlines."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or "type" not in part:
                raise _bad(f"messages[{index}].content parts must be objects with a 'type'",
                           f"messages[{index}].content")
            if part["type"] != "text":
                raise _bad(f"messages[{index}].content part type {part['type']!r} is not supported: this server "
                           "serves a text-only model (send text parts)", f"messages[{index}].content")
            if not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}].content text part needs a string 'text'",
                           f"messages[{index}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"messages[{index}].content must be a string or a list of parts, got {type(content).__name__}")


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise _bad("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if hasattr(m, "model_dump"):  # a pydantic message object
            m = m.model_dump(exclude_none=True)
        if not isinstance(m, Mapping):
            raise _bad(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}] needs a string 'role'")
        msg = dict(m)
        if "content" not in msg or msg["content"] is None:
            if not (role in _ROLES_NEEDING_NO_CONTENT and msg.get("tool_calls")):
                raise _bad(f"messages[{i}].content: a {role} message needs a content (null is allowed only "
                           "for an assistant message with tool_calls)", f"messages[{i}].content")
            msg["content"] = None
        else:
            msg["content"] = _normalize_content(msg["content"], i)
        out.append(msg)
    return out


class Processor:
    """Chat template + tokenization + request validation for one model."""

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int,
                 streaming_max_prompt: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len)
        self.vocab_size = int(vocab_size)
        # longest prompt of a kv_eviction="streaming" request (sinks + window); None: not available
        self.streaming_max_prompt = streaming_max_prompt

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, tools: Optional[list] = None,
                            chat_template: Optional[str] = None, **kwargs: Any) -> list[int]:
        """Render `messages` with the tokenizer's Jinja chat template (or `chat_template`) and tokenize.

        transformers renders the template in a sandboxed Jinja environment. The rendered text already
        holds the template's special tokens (BOS, ...), so it is tokenized without adding any. Like vLLM,
        a tokenizer without a chat template is an error (InvalidRequestError) unless `chat_template` is
        given; there is no built-in fallback format. Template errors (including the template's own
        ``raise_exception``) become InvalidRequestError. Extra kwargs (e.g. ``enable_thinking``) go to the
        template.
        """
        msgs = _normalize_messages(messages)
        for i, m in enumerate(msgs):
            if isinstance(m.get("content"), str):
                _check_unicode(m["content"], f"messages[{i}].content")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise _bad("the model's tokenizer has no chat template; pass a chat_template or use completions",
                       param="chat_template")
        try:
            import jinja2

            jinja_errors: tuple = (jinja2.TemplateError,)
        except ImportError:  # pragma: no cover - jinja2 comes with transformers
            jinja_errors = ()
        try:
            text = self.tokenizer.apply_chat_template(msgs, tools=tools, chat_template=chat_template,
                                                      add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **kwargs)
        except (*jinja_errors, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _bad(f"cannot apply the chat template: {msg}") from e
        if not isinstance(text, str):  # some transformers versions return a list for a batch
            text = text[0]
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's BOS if it adds one, never twice) or a checked id list."""
        if isinstance(prompt, str):
            _check_unicode(prompt, "prompt")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
            bos, bos_text = getattr(self.tokenizer, "bos_token_id", None), getattr(self.tokenizer, "bos_token", None)
            if (bos is not None and bos_text and len(ids) >= 2 and ids[0] == ids[1] == bos
                    and prompt.startswith(bos_text)):
                ids = ids[1:]  # the text already starts with the BOS token
            return ids
        if not isinstance(prompt, (list, tuple)):
            raise _bad(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise _bad("prompt token ids must be integers", "prompt")
        return list(prompt)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Check a tokenized request and return its effective max_tokens.

        Errors: an empty prompt or an id outside [0, vocab_size) -> InvalidRequestError; a prompt of
        max_model_len tokens or more -> PromptTooLongError. `max_tokens=None` means "up to the context
        length": max_model_len - len(prompt). Like vLLM (and unlike OpenAI, which clamps), a prompt plus
        max_tokens longer than max_model_len is an error (PromptTooLongError, HTTP 400), not clamped.
        """
        n = len(prompt_ids)
        if n == 0:
            raise _bad("the prompt is empty", "prompt")
        for t in prompt_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise _bad(f"prompt token id {t!r} is out of range [0, {self.vocab_size})", "prompt")
        if params.kv_eviction == "streaming":
            return self._validate_streaming(n, params)
        if n >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {n} tokens but the model's context length is "
                                     f"{self.max_model_len} tokens (max_model_len); shorten the prompt")
        params.validate_vocab(self.vocab_size)
        room = self.max_model_len - n
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {n + params.max_tokens} "
                f"were requested ({n} in the prompt, {params.max_tokens} for max_tokens); "
                f"reduce the prompt or max_tokens", param="max_tokens")
        return params.max_tokens

    def _validate_streaming(self, n: int, params: SamplingParams) -> int:
        """A streaming request: the prompt fits sinks + window; max_tokens is not capped by max_model_len."""
        if self.streaming_max_prompt is None:
            raise _bad("kv_eviction='streaming' needs cached keys it can re-rotate: a RoPE model with per-head keys "
                       "(not MLA latents) and a plain KV cache (kv_cache_dtype auto, float32 or bfloat16; not "
                       "int8/fp8)", "kv_eviction")
        if n > self.streaming_max_prompt:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but a kv_eviction='streaming' request keeps at most "
                f"{self.streaming_max_prompt} (streaming_sink_tokens + streaming_window_tokens); shorten the prompt",
                param="prompt")
        params.validate_vocab(self.vocab_size)
        # endless generation is what streaming eviction allows, not what a request without max_tokens gets
        return params.max_tokens if params.max_tokens is not None else self.max_model_len
