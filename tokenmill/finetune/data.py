"""Training files: OpenAI's chat fine-tuning JSONL, validated line by line, and tokenized with the chat template.

One example per line: {"messages": [{"role": "system" | "user" | "assistant", "content": "...",
"weight": 0 | 1 (assistant only, optional)}, ...]}. Every line is checked; the first bad one is an
InvalidRequestError naming its line number (HTTP 400). Tokenization renders the conversation with the
model's chat template and marks the tokens of each assistant turn (weight 1) as trained: the loss counts
only them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tokenmill.errors import InvalidRequestError

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "weight", "name"}


def _bad(line: int, why: str, param: str = "file") -> InvalidRequestError:
    return InvalidRequestError(f"line {line}: {why}", param=param, code="invalid_training_file")


def parse_chat_jsonl(data: bytes, param: str = "file") -> list[list[dict[str, Any]]]:
    """Bytes of a JSONL file -> one message list per non-empty line; any malformed line raises, naming it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise _bad(line, "not valid UTF-8", param) from None
    examples: list[list[dict[str, Any]]] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _bad(n, f"not valid JSON ({e.msg} at column {e.colno})", param) from None
        examples.append(_check_example(obj, n, param))
    if not examples:
        raise InvalidRequestError("the training file has no examples", param=param, code="invalid_training_file")
    return examples


def _check_example(obj: Any, n: int, param: str) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        raise _bad(n, "each line must be a JSON object with a `messages` list", param)
    extra = set(obj) - {"messages"}
    if extra:
        raise _bad(n, f"unsupported field(s) {sorted(extra)} (only `messages`)", param)
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad(n, "`messages` must be a non-empty list", param)
    trained = 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(n, f"messages[{i}] must be an object", param)
        extra = set(m) - MESSAGE_KEYS
        if extra:
            raise _bad(n, f"messages[{i}] has unsupported field(s) {sorted(extra)}", param)
        if m.get("role") not in ROLES:
            raise _bad(n, f"messages[{i}].role must be one of {', '.join(ROLES)}", param)
        if not isinstance(m.get("content"), str):
            raise _bad(n, f"messages[{i}].content must be a string", param)
        if "name" in m and not isinstance(m["name"], str):
            raise _bad(n, f"messages[{i}].name must be a string", param)
        if "weight" in m:
            if m["role"] != "assistant":
                raise _bad(n, f"messages[{i}].weight is allowed on assistant messages only", param)
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise _bad(n, f"messages[{i}].weight must be 0 or 1", param)
        if m["role"] == "assistant" and m.get("weight", 1) == 1:
            trained += 1
    if trained == 0:
        raise _bad(n, "the example has no assistant message to train on", param)
    return msgs


@dataclass
class TokenizedExample:
    """One conversation as token ids; loss_mask[i] = 1 where token i is an assistant token to predict."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])  # the first token is never predicted


def tokenize_examples(examples: list[list[dict[str, Any]]],
                      render: Callable[[list[dict[str, Any]], bool], list[int]],
                      max_tokens: Optional[int] = None, param: str = "training_file") -> list[TokenizedExample]:
    """render(messages, add_generation_prompt) -> token ids (the chat template). Each assistant turn's tokens
    are those its rendering adds to the prompt before it (with the generation prompt): its text and the
    end-of-turn tokens. An example longer than max_tokens raises, naming its line (1-based, counting
    examples)."""
    out = []
    for n, msgs in enumerate(examples, start=1):
        msgs = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
        weights = [m.get("weight", 1) for m in examples[n - 1]]
        full = render(msgs, False)
        mask = [0] * len(full)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or weights[i] == 0:
                continue
            start = len(render(msgs[:i], True)) if i else 0
            upto = render(msgs[: i + 1], False)
            if full[: len(upto)] != upto or start > len(upto):
                raise _bad(n, "the chat template does not render this conversation turn by turn, so the "
                              "assistant tokens cannot be found", param)
            for j in range(start, len(upto)):
                mask[j] = 1
        ex = TokenizedExample(full, mask)
        if ex.num_loss_tokens == 0:
            raise _bad(n, "no assistant tokens after rendering with the chat template", param)
        if max_tokens is not None and ex.num_tokens > max_tokens:
            raise _bad(n, f"the example has {ex.num_tokens} tokens, more than the {max_tokens} a training step "
                          "may take (--finetune-max-step-tokens, or max_model_len)", param)
        out.append(ex)
    return out
