"""Tool calls out of model text, whole or streamed, per model family.

Formats (`TOOL_PARSERS`):
- `hermes` (Hermes, Qwen2/2.5/3): `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, any number,
  text before, between and after allowed. A list of call objects inside one tag is accepted too.
- `generic`: tokenmill's format for models whose chat template knows no tools; the same wire format as
  `hermes` (`<tool_call>` + one JSON object `{"name": ..., "arguments": {...}}` + `</tool_call>`), which
  a small model can copy from the prompt (`tools/prompt.py`) and a grammar can enforce
  (`tools/constraints.py`).
- `llama3_json` (Llama 3.1/3.2/3.3): a JSON object `{"name": "f", "parameters": {...}}`, optionally after
  `<|python_tag|>`; several separated by `;`.
- `mistral`: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]` (v3 tokenizers) and
  `[TOOL_CALLS]f[ARGS]{...}` (v11+), repeated for several calls.
In every format `"arguments"` and `"parameters"` are both accepted.

One state machine (`StreamingToolParser`) serves both uses: `ToolCallParser.parse(text)` is the stream
fed the whole text at once, so any chunking of the same text adds up to the same result.
Rules it follows:
- Text that may still become a trigger (`<tool_ca`, `[TOOL_`) is held back, never sent as content.
- A call is committed (its id and name are sent) once its header is seen: the trigger and the object
  up to `{"name": "f", "arguments": {`. The arguments then stream as they arrive, checked character
  by character by a strict JSON scanner, with insignificant whitespace dropped (compact JSON).
- Before the commit, anything that stops being a valid call (bad JSON, a name not in `tool_names`, the
  output ending) turns the held text back into content, and scanning resumes one character after the
  trigger. When the keys come in another order (or the arguments are a JSON string), a `hermes`,
  `generic` or `mistral` call is read whole first and sent at once if it is valid.
- After the commit the call stays. If its JSON then breaks or the output ends (max_tokens), the call
  keeps the arguments sent so far and the rest of the text is content again. With
  `stream_arguments=False` a call is instead sent whole once its JSON is complete and valid, so a call
  with malformed arguments is content too (the choice for unconstrained output).
- Compact arguments drop only insignificant whitespace; escapes and numbers stay as the model wrote them.
- Whitespace next to a call is dropped; content is None when an output has only calls.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from tokenmill.tools.stream import StreamingToolParser

from tokenmill.tools.json_scan import NEED, compact, members, scan_string, skip_ws
from tokenmill.tools.types import random_call_id, random_mistral_call_id

_MISMATCH = "mismatch"
_ARG_KEYS = ("arguments", "parameters")


def _match_lit(s: str, i: int, lit: str) -> Any:
    """Index past `lit` at `s[i:]`, NEED when `s` ends inside a prefix of it, else None."""
    if s.startswith(lit, i):
        return i + len(lit)
    rest = s[i:]
    return NEED if len(rest) < len(lit) and lit.startswith(rest) else None


def _json_string_at(s: str, i: int) -> Any:
    """The decoded JSON string starting at `s[i]` and the index after it; NEED; or _MISMATCH."""
    if i >= len(s):
        return NEED
    if s[i] != '"':
        return _MISMATCH
    end = scan_string(s, i)
    if end == NEED:
        return NEED
    if end is None:
        return _MISMATCH
    return json.loads(s[i:end]), end


def parse_call_header(s: str, i: int, names: Optional[frozenset]) -> Any:
    """`s[i]` is `{`. Match `{"name": "<f>", "arguments"|"parameters": {` (any JSON whitespace; a
    leading `"type": "function",` pair, as Llama 3.2 writes, is allowed).
    Returns (name, index of the arguments' `{`), NEED, or _MISMATCH."""
    steps: list[str] = ["key:name", ":", "name", ",", "key:args", ":"]
    j, k = i + 1, 0
    name = None
    while k < len(steps):
        step = steps[k]
        k += 1
        j = skip_ws(s, j)
        if j >= len(s):
            return NEED
        if step in (":", ","):
            if s[j] != step:
                return _MISMATCH
            j += 1
            continue
        r = _json_string_at(s, j)
        if not isinstance(r, tuple):
            return r
        value, j = r
        if step == "key:name" and value == "type" and k == 1:
            steps[1:1] = [":", "type", ",", "key:name"]  # `"type": "function",` first
            continue
        if step == "type" and value != "function":
            return _MISMATCH
        if step == "key:name" and value != "name":
            return _MISMATCH
        if step == "key:args" and value not in _ARG_KEYS:
            return _MISMATCH
        if step == "name":
            if not value or (names is not None and value not in names):
                return _MISMATCH
            name = value
    j = skip_ws(s, j)
    if j >= len(s):
        return NEED
    return (name, j) if s[j] == "{" else _MISMATCH


def _call_from_object(text: str, names: Optional[frozenset]) -> Optional[tuple[str, str]]:
    """(name, compact arguments) from a compact call object's text, or None when it is not a call."""
    if not text.startswith("{"):
        return None
    fields = dict(members(text))
    name = json.loads(fields["name"]) if "name" in fields else None
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    keys = [k for k in _ARG_KEYS if k in fields]
    if len(keys) != 1:
        return None
    args = fields[keys[0]]
    if args.startswith('"'):  # arguments sent as a JSON-encoded string
        try:
            args = compact(json.loads(args))
        except ValueError:
            return None
    return (name, args) if args.startswith("{") else None


class _Format:
    """How one model family marks its calls. Methods get the parser `p` (for per-stream flags), the
    buffer `s`, and an index; they return an action tuple (see `StreamingToolParser._act`)."""

    name = ""
    triggers: tuple[str, ...] = ()
    fallback = True  # a call object in another shape is read whole before deciding
    new_id: Callable[[], str] = staticmethod(random_call_id)

    def open(self, p: "StreamingToolParser", s: str, trigger: str, i: int, eof: bool) -> tuple:
        raise NotImplementedError

    def close(self, p: "StreamingToolParser", s: str, i: int, eof: bool) -> tuple:
        raise NotImplementedError

    def calls_from_text(self, text: str, names: Optional[frozenset]) -> Optional[list[tuple[str, str]]]:
        """The calls in a complete compact JSON value read whole (a call object or a list of them)."""
        items = [v for _, v in members(text)] if text.startswith("[") else [text]
        calls = [_call_from_object(v, names) for v in items]
        return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


class _Hermes(_Format):
    name = "hermes"
    triggers = ("<tool_call>",)

    def open(self, p, s, trigger, i, eof):
        i = skip_ws(s, i)
        if i >= len(s):
            return ("need",)
        return ("call", i) if s[i] == "{" else ("buffer", i) if s[i] == "[" else ("fail",)

    def close(self, p, s, i, eof):
        j = skip_ws(s, i)
        end = _match_lit(s, j, "</tool_call>")
        if end == NEED:
            return ("need",)
        return ("text", j if end is None else end)  # a missing closing tag is forgiven


class _Generic(_Hermes):
    name = "generic"


class _Llama3Json(_Format):
    name = "llama3_json"
    triggers = ("<|python_tag|>", "{")
    fallback = False  # `{` is an ordinary character: only the exact call shape counts

    def open(self, p, s, trigger, i, eof):
        if trigger == "{":
            return ("call", i - 1)
        i = skip_ws(s, i)
        if i >= len(s):
            return ("need",)
        return ("call", i) if s[i] == "{" else ("fail",)

    def close(self, p, s, i, eof):
        j = skip_ws(s, i)
        if j >= len(s):
            return ("need",)
        return ("text", j + 1 if s[j] == ";" else j)


class _Mistral(_Format):
    name = "mistral"
    triggers = ("[TOOL_CALLS]",)
    new_id = staticmethod(random_mistral_call_id)

    def open(self, p, s, trigger, i, eof):
        i = skip_ws(s, i)
        if i >= len(s):
            return ("need",)
        p.in_list = s[i] == "["
        if p.in_list:
            i = skip_ws(s, i + 1)
            if i >= len(s):
                return ("need",)
            return ("call", i) if s[i] == "{" else ("fail",)
        if s[i] == "{":
            return ("call", i)
        j = i
        while j < len(s) and (s[j].isalnum() or s[j] in "_-."):
            j += 1
        if j == i:
            return ("fail",)
        if j >= len(s):
            return ("need",)
        name = s[i:j]
        k = _match_lit(s, j, "[ARGS]")
        if k == NEED:
            return ("need",)
        if k is None:
            return ("fail",)
        k = skip_ws(s, k)
        if k >= len(s):
            return ("need",)
        return ("named", name, k) if s[k] == "{" else ("fail",)

    def close(self, p, s, i, eof):
        if not p.in_list:
            return ("text", i)
        j = skip_ws(s, i)
        if j >= len(s):
            return ("need",)
        if s[j] == "]":
            return ("text", j + 1)
        if s[j] != ",":
            return ("error", j)
        k = skip_ws(s, j + 1)
        if k >= len(s):
            return ("need",)
        return ("call", k) if s[k] == "{" else ("error", k)


TOOL_PARSERS: dict[str, type[_Format]] = {f.name: f for f in (_Hermes, _Generic, _Llama3Json, _Mistral)}
