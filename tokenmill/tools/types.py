"""What the tool-call parsers return: whole calls, and the streaming deltas that add up to them."""
from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

_ALNUM = string.ascii_letters + string.digits


def random_call_id() -> str:
    """An OpenAI-style tool call id: `call_` + 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def random_mistral_call_id() -> str:
    """Mistral chat templates reject tool call ids that are not exactly 9 alphanumerics."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


@dataclass(frozen=True)
class ToolCall:
    """One complete call. `arguments` is JSON text (compact: no whitespace outside strings)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The element of a chat completion message's `tool_calls` list."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    """A piece of ordinary text (not part of any call)."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call number `index` (0, 1, ... within one output). The first delta of a call carries
    `id` and `name` (and `arguments` ""); the later ones carry only pieces of `arguments`."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The element of a streaming chunk's `delta.tool_calls` list."""
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        fn: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            fn["name"] = self.name
        out["function"] = fn
        return out


Delta = Union[ContentDelta, ToolCallDelta]


class ParsedOutput(NamedTuple):
    """A whole output split into its text (None when there is none) and its calls."""

    content: Optional[str]
    tool_calls: list[ToolCall]


def assemble(deltas: list[Delta]) -> ParsedOutput:
    """Add up streaming deltas the way an OpenAI client does (content concatenated, calls by index)."""
    text: list[str] = []
    calls: dict[int, list[Any]] = {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            text.append(d.text)
            continue
        if d.index not in calls:
            if d.id is None or d.name is None:
                raise ValueError(f"the first delta of tool call {d.index} has no id or name")
            calls[d.index] = [d.id, d.name, []]
        elif d.id is not None or d.name is not None:
            raise ValueError(f"tool call {d.index} got a second id or name")
        calls[d.index][2].append(d.arguments)
    if sorted(calls) != list(range(len(calls))):
        raise ValueError(f"tool call indexes are not 0..n-1: {sorted(calls)}")
    content = "".join(text)
    return ParsedOutput(content or None,
                        [ToolCall(c[0], c[1], "".join(c[2])) for _, c in sorted(calls.items())])
