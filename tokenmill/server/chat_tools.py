"""Tool calling in the chat handler: validate `tools` / `tool_choice`, put the tools and the history in the
prompt (the model's template when it knows tools, else tokenmill's generic tool prompt), constrain the
output when a call is required (xgrammar), and parse the output into OpenAI `tool_calls`, whole or
streamed as `delta.tool_calls` chunks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.tools import (ContentDelta, ToolCallDelta, ToolRequest, build_tool_constraint, detect_parser,
                             generic_messages, get_tool_parser, needs_generic_prompt, template_messages,
                             validate_tools)


@dataclass
class ChatTools:
    """What one chat request's tools turn into."""

    messages: list[dict[str, Any]]
    template_tools: Optional[list[dict[str, Any]]]  # passed to the chat template (None: in the messages)
    request: Optional[ToolRequest]  # None or choice "none": no parsing, no constraint
    parser_name: str
    constraint: Optional[StructuredOutputsParams]

    @property
    def active(self) -> bool:
        return self.request is not None and self.request.choice != "none"

    def parser(self):
        assert self.request is not None
        return get_tool_parser(self.parser_name, tool_names=self.request.names)


def _has_tool_history(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def prepare_tools(messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]], tool_choice: Any,
                  parallel_tool_calls: Optional[bool], chat_template: Optional[str], model_type: Optional[str],
                  parser_override: Optional[str]) -> ChatTools:
    """Raises ToolValidationError (HTTP 400 naming the field) for bad tools or tool_choice."""
    if tool_choice is not None and not tools and tool_choice not in ("none", "auto"):
        raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
    req = validate_tools(tools, tool_choice, parallel_tool_calls)
    parser_name = parser_override or detect_parser(chat_template, model_type)
    active = req is not None and req.choice != "none"
    if needs_generic_prompt(chat_template, parser_name):
        if active:
            assert req is not None
            msgs = generic_messages(messages, tools=req.openai_tools(), tool_choice=tool_choice or "auto",
                                    parallel_tool_calls=req.parallel, parser_name=parser_name)
        elif _has_tool_history(messages):
            msgs = generic_messages(messages, tools=None, tool_choice="none", parser_name=parser_name)
        else:
            msgs = messages
        template_tools = None
    else:
        msgs = template_messages(messages) if _has_tool_history(messages) else messages
        template_tools = req.openai_tools() if active and req is not None else None
    constraint = None
    if active:
        tc = build_tool_constraint(req, parser_name)
        if tc is not None:
            constraint = StructuredOutputsParams(grammar=tc.ebnf())
    return ChatTools(msgs, template_tools, req if active else None, parser_name, constraint)


class ToolStream:
    """One streamed choice's tool parsing: text deltas in, OpenAI `delta` objects out."""

    def __init__(self, tools: ChatTools):
        self.parser = tools.parser().streaming()

    def _deltas(self, items) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for d in items:
            if isinstance(d, ContentDelta):
                if d.text:
                    out.append({"content": d.text})
            elif isinstance(d, ToolCallDelta):
                out.append({"tool_calls": [d.to_openai()]})
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.parser.feed(text)) if text else []

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas(self.parser.finish())

    @property
    def num_calls(self) -> int:
        return self.parser.num_calls


def finish_reason(reason: Optional[str], num_calls: int) -> Optional[str]:
    """"tool_calls" when the model made calls and stopped by itself (a call cut by max_tokens stays "length")."""
    return "tool_calls" if num_calls and reason == "stop" else reason
