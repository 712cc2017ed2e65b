"""What the chat-shaped APIs other than chat completions (OpenAI Responses, Anthropic Messages) share: one
generation's output as text + tool calls, whole or as a stream of events, and a bounded store of finished
conversations."""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from tokenmill.server.chat_tools import ChatTools, finish_reason
from tokenmill.server.generation import Generation
from tokenmill.tools import ContentDelta, ToolCallDelta


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArgs:
    index: int
    text: str


@dataclass(frozen=True)
class Finish:
    reason: Optional[str]  # "stop", "length", "tool_calls" (OpenAI chat's names)
    stop_reason: Optional[Union[int, str]]  # the stop string or token id that ended it, if any
    num_cached_tokens: int


Event = Union[TextEvent, CallStart, CallArgs, Finish]


async def chat_events(gen: Generation, tools: ChatTools) -> AsyncIterator[Event]:
    """The streamed output of a one-sample chat generation: text pieces, calls (start, then argument pieces),
    and one Finish at the end."""
    parser = tools.parser().streaming() if tools.active else None
    async for out in gen.outputs():
        o = out.outputs[0]
        finish = o.finish_reason
        if parser is None:
            if o.text:
                yield TextEvent(o.text)
        else:
            items = list(parser.feed(o.text)) if o.text else []
            if finish is not None:
                items += list(parser.finish())
            for d in items:
                if isinstance(d, ContentDelta):
                    if d.text:
                        yield TextEvent(d.text)
                elif isinstance(d, ToolCallDelta):
                    if d.id is not None:
                        yield CallStart(d.index, d.id, d.name or "")
                    if d.arguments:
                        yield CallArgs(d.index, d.arguments)
        if finish is not None:
            yield Finish(finish_reason(finish, parser.num_calls if parser is not None else 0), o.stop_reason,
                         int(getattr(out, "num_cached_tokens", 0) or 0))
            return


@dataclass
class FinalOutput:
    content: str  # the text outside tool calls
    calls: list[Any]  # tokenmill.tools ToolCall (id, name, arguments JSON text)
    reason: Optional[str]
    stop_reason: Optional[Union[int, str]]
    num_cached_tokens: int
    raw: str = ""  # the whole generated text, calls included


def final_output(out: Any, tools: ChatTools) -> FinalOutput:
    """A finished one-sample chat generation's text and tool calls."""
    o = out.outputs[0]
    if not tools.active:
        return FinalOutput(o.text, [], o.finish_reason, o.stop_reason, int(getattr(out, "num_cached_tokens", 0) or 0),
                           o.text)
    parsed = tools.parser().parse(o.text)
    calls = list(parsed.tool_calls)
    return FinalOutput(parsed.content or "", calls, finish_reason(o.finish_reason, len(calls)), o.stop_reason,
                       int(getattr(out, "num_cached_tokens", 0) or 0), o.text)


class ConversationStore:
    """Finished responses kept in memory for `previous_response_id` and GET: an LRU bounded by the size of
    the stored JSON (a response larger than the whole bound is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, response: dict[str, Any], history: list[dict[str, Any]]) -> bool:
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(history, ensure_ascii=False))
        self.delete(rid)
        if size > self.max_bytes:
            return False
        while self._items and self.used + size > self.max_bytes:
            _, (_, _, s) = self._items.popitem(last=False)
            self.used -= s
        self._items[rid] = (response, history, size)
        self.used += size
        return True

    def get(self, rid: str) -> Optional[tuple[dict[str, Any], list[dict[str, Any]]]]:
        item = self._items.get(rid)
        if item is None:
            return None
        self._items.move_to_end(rid)
        return item[0], item[1]

    def delete(self, rid: str) -> bool:
        item = self._items.pop(rid, None)
        if item is None:
            return False
        self.used -= item[2]
        return True
