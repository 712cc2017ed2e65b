"""What the constrained decoder (xgrammar) needs so that tool calls parse.

`build_tool_constraint(request, parser_name)` returns an xgrammar structural tag whose language is the
parser's format with each call's arguments matching that function's `parameters` schema:
- `required`: one call of any declared function (several, one after another, when
  `parallel_tool_calls`), and nothing else;
- a named function: exactly one call of it, and nothing else;
- `auto`: free text; once the model writes the format's trigger (`<tool_call>`, `{"name": `,
  `[TOOL_CALLS]`) the call must be complete and valid (after it, free text again, or the end when
  `parallel_tool_calls` is false).
`ToolConstraint.structural_tag` is the JSON that `xgrammar.Grammar.from_structural_tag` takes (and that
OpenAI-style `response_format: {"type": "structural_tag", ...}` carries); `ToolConstraint.ebnf()` is the
same language as an xgrammar EBNF grammar string.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.tools.validate import FunctionTool, ToolRequest

# JSON inside a call may not run on with whitespace (tiny models loop on "\n" when they may)
MAX_JSON_WHITESPACE = 16


@dataclass(frozen=True)
class ToolConstraint:
    structural_tag: str  # JSON text of an xgrammar StructuralTag

    def grammar(self) -> Any:
        """The compiled-language `xgrammar.Grammar` (tokenizer-independent)."""
        import xgrammar as xgr

        return xgr.Grammar.from_structural_tag(self.structural_tag)

    def ebnf(self) -> str:
        """The same language as an xgrammar EBNF string (`xgrammar.Grammar.from_ebnf` reads it back)."""
        return str(self.grammar())


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def _tag(begin: str, content: dict[str, Any], end: str) -> dict[str, Any]:
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def _one_of(elements: list[dict[str, Any]]) -> dict[str, Any]:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": elements}


def _calls(tags: list[dict[str, Any]], separator: str, several: bool) -> dict[str, Any]:
    """One of `tags`, or (several) one or more of them separated by `separator`."""
    if not several:
        return _one_of(tags)
    return {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True}


def _object_head(name: str, args_key: str) -> str:
    """`{"name": "<f>", "<args_key>": ` exactly as the parsers' fast path reads it."""
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "' + args_key + '": '


def _format(tools: tuple[FunctionTool, ...], parser_name: str, mode: str, several: bool) -> dict[str, Any]:
    """mode "auto" (free text with triggered calls) or "call" (calls only)."""
    if parser_name in ("hermes", "generic"):
        tags = [_tag("<tool_call>\n" + _object_head(t.name, "arguments"), _json(t.parameters), "}\n</tool_call>")
                for t in tools]
        if mode == "auto":
            return {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags,
                    "stop_after_first": not several}
        return _calls(tags, "\n", several)
    if parser_name == "llama3_json":
        tags = [_tag(_object_head(t.name, "parameters"), _json(t.parameters), "}") for t in tools]
        if mode == "auto":
            return {"type": "triggered_tags", "triggers": ['{"name": '], "tags": tags,
                    "stop_after_first": not several}
        return _calls(tags, "; ", several)
    if parser_name == "mistral":
        # `[TOOL_CALLS]f[ARGS]{...}` (v11+ templates) or `[TOOL_CALLS][{"name": "f", "arguments": {...}}]`
        named = [_tag("[TOOL_CALLS]" + t.name + "[ARGS]", _json(t.parameters), "") for t in tools]
        objects = [_tag(_object_head(t.name, "arguments"), _json(t.parameters), "}") for t in tools]
        listed = _tag("[TOOL_CALLS][", _calls(objects, ", ", several), "]")
        if mode == "auto":
            return {"type": "triggered_tags", "triggers": ["[TOOL_CALLS]"], "tags": named + [listed],
                    "stop_after_first": not several}
        named_calls = {"type": "plus", "content": _one_of(named)} if several else _one_of(named)
        return {"type": "or", "elements": [named_calls, listed]}
    raise ValueError(f"no tool call grammar for parser {parser_name!r}")


def build_tool_constraint(request: Optional[ToolRequest], parser_name: str) -> Optional[ToolConstraint]:
    """The constraint for a checked request (`validate_tools`), or None when nothing is constrained
    (no tools, or tool_choice "none")."""
    if request is None or request.choice == "none":
        return None
    if request.choice == "function":
        tools = tuple(t for t in request.tools if t.name == request.function)
        fmt = _format(tools, parser_name, "call", several=False)
    else:
        mode = "auto" if request.choice == "auto" else "call"
        fmt = _format(request.tools, parser_name, mode, several=request.parallel)
    return ToolConstraint(json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False))
