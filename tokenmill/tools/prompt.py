"""Tools in the prompt.

- Templates that read `tools` (Qwen, Llama 3.1+, Mistral, ...) get the OpenAI messages almost as they
  are: `template_messages` only decodes each call's `arguments` JSON string into a dict, the shape
  Hugging Face templates expect.
- Templates that know no tools (SmolLM2's: role and content only) get `generic_messages`: the tool list
  and the output format as a system message that tokenmill writes (`render_tool_prompt`), assistant
  calls written out in the format the model is asked to use, and `tool` results turned into user
  messages ("Tool result for call <id> (<name>): <content>").
"""
from __future__ import annotations

import copy
import json
from typing import Any, Optional

from tokenmill.tools.select import template_supports_tools


def needs_generic_prompt(chat_template: Optional[str], parser_name: str) -> bool:
    """Whether tokenmill writes the tool prompt itself: the template ignores `tools`, or the output is
    parsed as `generic` (tokenmill's own format, which a template cannot describe)."""
    return parser_name == "generic" or not template_supports_tools(chat_template)


def _text(content: Any) -> str:
    """Message content as plain text (a list of content parts is joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _args_value(arguments: Any) -> Any:
    """A call's arguments as a JSON value (OpenAI sends a JSON string; a bad one stays a string)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}


def _tool_function(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function", tool)
    out = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def format_call(name: str, arguments: Any, parser_name: str = "generic") -> str:
    """One call written the way the parser `parser_name` reads it."""
    args = _args_value(arguments)
    if parser_name == "llama3_json":
        return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
    if parser_name == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": args}], ensure_ascii=False)
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


_FORMAT_HELP = {
    "generic": ('To call a tool, write exactly:\n<tool_call>\n{"name": "<tool name>", "arguments": '
                '<the arguments as a JSON object>}\n</tool_call>'),
    "llama3_json": ('To call a tool, reply with only this JSON:\n{"name": "<tool name>", "parameters": '
                    '<the arguments as a JSON object>}'),
    "mistral": ('To call a tool, reply with only:\n[TOOL_CALLS][{"name": "<tool name>", "arguments": '
                '<the arguments as a JSON object>}]'),
}
_FORMAT_HELP["hermes"] = _FORMAT_HELP["generic"]
_SEVERAL = {
    "generic": "To call several tools, write one <tool_call> block for each.",
    "llama3_json": "To call several tools, separate the JSON objects with `; `.",
    "mistral": "To call several tools, put one object for each in the list.",
}
_SEVERAL["hermes"] = _SEVERAL["generic"]


def render_tool_prompt(tools: list[dict[str, Any]], tool_choice: Any = "auto", parallel_tool_calls: bool = True,
                       parser_name: str = "generic") -> str:
    """The system-message text that lists `tools` (OpenAI `{"type": "function", "function": {...}}`
    entries) and explains how to call them. `tool_choice`: "auto", "required", or a named function
    (`{"type": "function", "function": {"name": ...}}` or the bare name)."""
    lines = ["You can call the following tools. Each is described by a JSON object with its name, what it "
             "does and a JSON schema of its arguments:", "<tools>"]
    lines += [json.dumps(_tool_function(t), ensure_ascii=False) for t in tools]
    lines += ["</tools>", "", _FORMAT_HELP.get(parser_name, _FORMAT_HELP["generic"])]
    lines.append(_SEVERAL.get(parser_name, _SEVERAL["generic"]) if parallel_tool_calls
                 else "Call at most one tool per reply.")
    if isinstance(tool_choice, dict):
        tool_choice = tool_choice.get("function", {}).get("name")
    if tool_choice == "required":
        lines.append("You must call at least one tool now.")
    elif tool_choice not in (None, "auto", "none"):
        lines.append(f'You must call the tool "{tool_choice}" now.')
    else:
        lines.append("If no tool is needed, answer the user directly in plain text.")
    lines.append("A tool's result comes back in a message that starts with \"Tool result\"; use it to answer.")
    return "\n".join(lines)


def generic_messages(messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None,
                     tool_choice: Any = "auto", parallel_tool_calls: bool = True,
                     parser_name: str = "generic") -> list[dict[str, Any]]:
    """`messages` rewritten for a template that knows only system/user/assistant with text content.

    The tool prompt (unless `tools` is empty or `tool_choice` is "none") joins the first system message
    or becomes one; assistant `tool_calls` become text in the `parser_name` format; consecutive `tool`
    messages become one user message. The input list is not modified."""
    names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant messages
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            parts = [_text(msg.get("content"))] if _text(msg.get("content")) else []
            for call in msg["tool_calls"]:
                fn = call.get("function", {})
                names[call.get("id", "")] = fn.get("name", "")
                parts.append(format_call(fn.get("name", ""), fn.get("arguments"), parser_name))
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            cid = msg.get("tool_call_id", "")
            name = names.get(cid) or msg.get("name") or "unknown"
            line = f"Tool result for call {cid} ({name}): {_text(msg.get('content'))}"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + line
            else:
                out.append({"role": "user", "content": line, "_tool_results": True})
        else:
            m = {k: v for k, v in msg.items() if k not in ("tool_calls", "tool_call_id")}
            m["content"] = _text(msg.get("content"))
            out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    if tools and tool_choice != "none":
        prompt = render_tool_prompt(tools, tool_choice, parallel_tool_calls, parser_name)
        if out and out[0].get("role") == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" + prompt) if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` for a template that renders tools itself: each assistant call's `arguments` JSON
    string becomes a dict (Hugging Face templates apply `tojson` to it). The input is not modified."""
    out = copy.deepcopy(messages)
    for msg in out:
        for call in msg.get("tool_calls") or []:
            fn = call.get("function")
            if isinstance(fn, dict) and "arguments" in fn:
                fn["arguments"] = _args_value(fn["arguments"])
    return out
