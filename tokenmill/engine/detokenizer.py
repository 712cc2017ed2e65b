"""Incremental detokenization and stop-string matching for streamed output.

IncrementalDetokenizer turns each step's new token ids into the new text, decoding only a short window of
recent ids (the idea of vLLM's ``detokenize_incrementally``: decode ``ids[prefix:read]`` and
``ids[prefix:]`` and emit the difference). The window starts a few tokens back so that decoders which depend
on context (the SentencePiece "strip the leading space of the first token" rule, byte fallback) see the
same context as a full decode. Text whose tail is U+FFFD (an unfinished multi-byte character) is held back
until a later token completes it, or until `flush()`.

StopChecker runs after it: it cuts the text at the earliest stop string and withholds any tail that could
still become a stop string, so a client never sees part of one.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

# How many prompt ids give the first output token its context (a UTF-8 character is at most 4 bytes).
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


def backend_decode(tokenizer: Any) -> Optional[Callable[..., str]]:
    """The Rust `tokenizers` decode behind a transformers fast tokenizer that overrides neither `decode` nor
    `_decode`: there ``tokenizer.decode(ids, skip_special_tokens=s, clean_up_tokenization_spaces=False)`` is
    ``backend.decode(ids, skip_special_tokens=s)`` (spaces_between_special_tokens is for slow tokenizers only),
    without transformers' Python layers around each call, which cost most of a streamed token's
    detokenization. None for any other tokenizer."""
    transformers = sys.modules.get("transformers")  # a transformers tokenizer has imported it
    fast = getattr(transformers, "PreTrainedTokenizerFast", None) if transformers is not None else None
    if fast is None or not isinstance(tokenizer, fast):
        return None
    cls = type(tokenizer)
    if getattr(cls, "decode", None) is not getattr(fast, "decode", None) or \
            getattr(cls, "_decode", None) is not getattr(fast, "_decode", None):
        return None
    return getattr(getattr(tokenizer, "_tokenizer", None), "decode", None)


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens.

    The text is the continuation of the prompt: ``decode(tail + output)[len(decode(tail)):]`` where `tail`
    is the last few prompt ids. For byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM) this equals
    ``tokenizer.decode(output_ids)``. For SentencePiece tokenizers (Llama 2, Mistral) it keeps the leading
    space of the first output token, so that ``prompt + text`` reads right (as vLLM does); with an empty
    prompt it equals ``tokenizer.decode(output_ids)`` there too. Decoding never cleans up tokenization
    spaces (the ``clean_up_tokenization_spaces`` rule is not incremental).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._backend = backend_decode(tokenizer)
        tail = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if tail and self._decode(tail).endswith(_REPLACEMENT):
            tail = []  # the prompt ends inside a character: no context is better than a broken one
        self._ids: list[int] = tail
        self._prefix_offset = 0  # window start: decoded for context only
        self._read_offset = len(tail)  # text of ids[prefix:read] has been emitted (or is prompt context)
        self._prefix_text = self._decode(tail) if tail else ""
        self._num_prompt_context = len(tail)
        self.output_text = ""

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens,
                                     clean_up_tokenization_spaces=False)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_prompt_context:]

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Append new output ids; return the text they complete (may be empty while a character is open)."""
        delta = []
        for token_id in new_token_ids:
            self._ids.append(int(token_id))
            new_text = self._decode(self._ids[self._prefix_offset:])
            if len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT):
                delta.append(new_text[len(self._prefix_text):])
                # The next window starts at the ids just emitted: they hold real text, so a decoder that
                # strips the first token's leading space strips it from them in both decodes.
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = "".join(delta)
        self.output_text += text
        return text

    def flush(self) -> str:
        """Text held back at the end of generation (an unfinished character decodes to U+FFFD)."""
        new_text = self._decode(self._ids[self._prefix_offset:])
        text = new_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        self.output_text += text
        return text


class StopChecker:
    """Cuts streamed text at the earliest stop string.

    `process(delta)` returns the text that is safe to show and whether a stop string was found. Text that
    could still be the start of a stop string is withheld until the next delta decides it; `flush()`
    returns it when generation ends without a stop. On a match the text ends right before the stop string
    (or right after it with `include_stop_str_in_output`); of stop strings starting at the same place the
    first one in `stop` wins.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched_stop: str | None = None

    def _withheld_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def process(self, delta: str) -> tuple[str, bool]:
        """Feed new text; return (text to emit, stopped). After a stop, returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        text = self._held + delta
        best = None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.stopped, self.matched_stop, self._held = True, s, ""
            return text[: i + len(s)] if self.include_stop_str_in_output else text[:i], True
        k = self._withheld_len(text)
        self._held = text[len(text) - k:] if k else ""
        return text[: len(text) - k], False

    def flush(self) -> str:
        """Withheld text, when generation ended without a stop string."""
        text, self._held = ("" if self.stopped else self._held), ""
        return text
