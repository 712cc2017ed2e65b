"""Checking a request's `tools`, `tool_choice` and `parallel_tool_calls` (HTTP 400 on anything wrong)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.errors import InvalidRequestError

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_EMPTY_PARAMS = {"type": "object", "properties": {}}


class ToolValidationError(InvalidRequestError):
    """A bad tool definition or tool_choice; `param` names the field ("tools[0].function.parameters")."""


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: Optional[str]
    parameters: dict[str, Any]  # a JSON schema of the arguments object


@dataclass(frozen=True)
class ToolRequest:
    """A checked request: `choice` is "none", "auto", "required" or "function" (then `function` names
    the one to call); `parallel` is `parallel_tool_calls` (default True)."""

    tools: tuple[FunctionTool, ...]
    choice: str
    function: Optional[str] = None
    parallel: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    def openai_tools(self) -> list[dict[str, Any]]:
        """The tools back in OpenAI form (for chat templates and the generic prompt)."""
        out = []
        for t in self.tools:
            fn: dict[str, Any] = {"name": t.name, "parameters": t.parameters}
            if t.description:
                fn["description"] = t.description
            out.append({"type": "function", "function": fn})
        return out


def _check_schema(schema: Any, param: str) -> None:
    import jsonschema
    import xgrammar as xgr

    if not isinstance(schema, dict):
        raise ToolValidationError("a function's parameters must be a JSON schema object", param=param)
    if schema.get("type", "object") != "object":
        raise ToolValidationError("a function's parameters schema must describe an object "
                                  f"(type 'object'), got type {schema.get('type')!r}", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ToolValidationError(f"invalid JSON schema: {e.message}", param=param) from None
    try:  # the schema must also be one the constrained decoder can enforce
        xgr.Grammar.from_json_schema(schema)
    except Exception as e:  # xgrammar raises RuntimeError / ValueError with its reason
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0]) if lines else type(e).__name__
        raise ToolValidationError(f"unsupported JSON schema: {reason}", param=param) from None


def _parse_tools(tools: Any) -> tuple[FunctionTool, ...]:
    if not isinstance(tools, list):
        raise ToolValidationError("tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
    out: list[FunctionTool] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ToolValidationError("a tool must be an object", param=p)
        if tool.get("type", "function") != "function":
            raise ToolValidationError(f"unsupported tool type {tool.get('type')!r}; only 'function' is supported",
                                      param=f"{p}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolValidationError("a tool needs a 'function' object", param=f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ToolValidationError(f"function name {name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$",
                                      param=f"{p}.function.name")
        if name in seen:
            raise ToolValidationError(f"function name {name!r} is declared twice", param=f"{p}.function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolValidationError("a function's description must be a string", param=f"{p}.function.description")
        params = fn.get("parameters")
        params = _EMPTY_PARAMS if params is None else params
        _check_schema(params, f"{p}.function.parameters")
        out.append(FunctionTool(name, desc, params))
    return tuple(out)


def validate_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> Optional[ToolRequest]:
    """Check the tool fields of a chat request (plain JSON values, as sent). Returns None when the
    request uses no tools (no or empty `tools`, and `tool_choice` absent, "none" or "auto"); raises ToolValidationError
    (an InvalidRequestError: HTTP 400) naming the bad field otherwise."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolValidationError("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    parsed = _parse_tools(tools) if tools is not None else ()
    if tool_choice is None:
        tool_choice = "auto" if parsed else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolValidationError(f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                                      f"got {tool_choice!r}", param="tool_choice")
        choice, function = tool_choice, None
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise ToolValidationError("a named tool_choice is {'type': 'function', 'function': {'name': ...}}",
                                      param="tool_choice")
        choice, function = "function", fn["name"]
    else:
        raise ToolValidationError("tool_choice must be a string or an object", param="tool_choice")
    if not parsed:
        if choice in ("none", "auto"):
            return None
        raise ToolValidationError(f"tool_choice {tool_choice!r} needs a non-empty tools list", param="tool_choice")
    if function is not None and function not in {t.name for t in parsed}:
        raise ToolValidationError(f"tool_choice names function {function!r}, which is not in tools",
                                  param="tool_choice")
    return ToolRequest(parsed, choice, function, parallel)
