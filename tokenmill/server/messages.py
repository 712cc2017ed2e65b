"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) over the chat path, so
tools built for that API can use a local tokenmill.

`system`, text / tool_use / tool_result blocks become chat messages; `tools` + `tool_choice` (auto, any, tool,
none) the chat tool machinery (grammar-enforced for any / tool); the output comes back as text and tool_use
blocks with Anthropic's stop reasons, or as its SSE events (message_start, content_block_start / delta / stop,
message_delta, message_stop). Errors on these routes use Anthropic's shape:
{"type": "error", "error": {"type", "message"}} (plus the `param` tokenmill names).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from tokenmill.errors import EngineDeadError, InvalidRequestError, TokenmillError
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.chat_core import CallArgs, CallStart, Finish, TextEvent, chat_events, final_output
from tokenmill.server.generation import EngineRequestError, Generation
from tokenmill.server.serving import OpenAIServing, check_text

UNSUPPORTED = {
    "thinking": "extended thinking is not supported: tokenmill runs no reasoning mode",
    "mcp_servers": "MCP servers are not supported",
    "container": "containers (code execution) are not supported",
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error"}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Optional[str] = None
    max_tokens: int = Field(..., ge=1)
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    system: Optional[Union[str, list[dict[str, Any]]]] = None
    stop_sequences: Optional[list[str]] = Field(None, max_length=16)
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=0, le=2 ** 31 - 1)
    stream: bool = False
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None


class CountTokensRequest(MessagesRequest):
    max_tokens: Optional[int] = Field(None, ge=1)  # type: ignore[assignment]


def anthropic_error(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    err_type = _ERROR_TYPES.get(status, "api_error")
    error: dict[str, Any] = {"type": err_type, "message": message}
    if param is not None:
        error["param"] = param
    return JSONResponse({"type": "error", "error": error}, status_code=status)


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _text_of(content: Any, param: str) -> str:
    """A tool_result's or system's content: a string or text blocks."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise _bad(f"{param} must be a string or a list of text blocks", param)
    parts = []
    for j, b in enumerate(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise _bad(f"{param}[{j}]: {kind!r} blocks are not supported here (text only)", f"{param}[{j}]")
        parts.append(b["text"])
    return "\n".join(parts)


def chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """system + messages as chat template messages (tool_use as assistant tool_calls, tool_result as tool
    messages)."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
    for i, m in enumerate(req.messages):
        p = f"messages[{i}]"
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"{p}.role must be user or assistant, got {role!r}", f"{p}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{p}.content must be a string or a list of content blocks", f"{p}.content")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(content):
            bp = f"{p}.content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise _bad(f"{bp}: a tool_use block needs an id and a name", bp)
                if not isinstance(b.get("input", {}), dict):
                    raise _bad(f"{bp}.input must be an object", f"{bp}.input")
                calls.append({"id": b["id"], "type": "function", "function": {
                    "name": b["name"], "arguments": json.dumps(b.get("input", {}), ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise _bad(f"{bp}.tool_use_id is required", f"{bp}.tool_use_id")
                text = _text_of(b.get("content"), f"{bp}.content")
                if b.get("is_error"):
                    text = f"Error: {text}"
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
            elif kind in ("tool_use", "tool_result"):
                raise _bad(f"{bp}: a {kind} block belongs in an {'assistant' if kind == 'tool_use' else 'user'} "
                           "message", bp)
            elif kind in ("image", "document", "search_result"):
                raise _bad(f"{bp}: {kind} blocks are not supported: this server serves a text-only model", bp)
            else:
                raise _bad(f"{bp}: unsupported content block type {kind!r} (text, tool_use, tool_result)", bp)
        if calls:
            out.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
        elif texts or role == "assistant":
            out.append({"role": role, "content": "\n".join(texts)})
    return out


def chat_tools_of(tools: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "custom") != "custom":
            kind = t.get("type") if isinstance(t, dict) else None
            raise _bad(f"tools[{i}]: server tool {kind!r} is not supported (only custom tools with an "
                       "input_schema are)", f"tools[{i}].type")
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise _bad(f"tools[{i}].name is required", f"tools[{i}].name")
        if not isinstance(t.get("input_schema"), dict):
            raise _bad(f"tools[{i}].input_schema is required (a JSON schema object)", f"tools[{i}].input_schema")
        fn = {"name": t["name"], "parameters": t["input_schema"]}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(tc: Optional[dict[str, Any]], has_tools: bool) -> tuple[Any, Optional[bool]]:
    """(chat tool_choice, parallel_tool_calls) from Anthropic's tool_choice."""
    if tc is None:
        return ("auto" if has_tools else None), None
    kind = tc.get("type")
    parallel = False if tc.get("disable_parallel_tool_use") else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool":
        if not isinstance(tc.get("name"), str):
            raise _bad("tool_choice.name is required for type tool", "tool_choice.name")
        return {"type": "function", "function": {"name": tc["name"]}}, parallel
    raise _bad(f"tool_choice.type {kind!r} is not one of auto, any, tool, none", "tool_choice.type")


def _object_or_none(text: str) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stop_reason_of(reason: Optional[str], stop: Optional[Union[int, str]],
                   sequences: list[str]) -> tuple[str, Optional[str]]:
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if isinstance(stop, str) and stop in sequences:
        return "stop_sequence", stop
    return "end_turn", None


class MessagesServing:
    """The /v1/messages handlers of one server (their errors in Anthropic's shape)."""

    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def _guard(self, raw: Request, handler: Any, model: type[MessagesRequest]) -> Response:
        try:
            try:
                body = await raw.json()
            except ValueError as e:
                raise _bad(f"malformed JSON body: {e}", "body") from None
            if not isinstance(body, dict):
                raise _bad("the body must be a JSON object", "body")
            try:
                req = model.model_validate(body)
            except ValidationError as e:
                first = e.errors()[0]
                param = ".".join(str(x) for x in first.get("loc", ())) or None
                more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
                return anthropic_error(400, f"{param}: {first.get('msg')}{more}", param)
            return await handler(req, raw)
        except TokenmillError as e:
            return anthropic_error(e.http_status, e.message, e.param)
        except EngineDeadError as e:
            return anthropic_error(503, f"the engine is not running: {e}")
        except EngineRequestError as e:
            return anthropic_error(500, str(e))

    async def create(self, raw: Request) -> Response:
        return await self._guard(raw, self._create, MessagesRequest)

    async def count_tokens(self, raw: Request) -> Response:
        return await self._guard(raw, self._count, CountTokensRequest)

    async def _render(self, req: MessagesRequest, count_only: bool = False):
        self.s.check_model(req.model)
        for name, value in (req.model_extra or {}).items():
            if name in UNSUPPORTED and value is not None and not (name == "thinking" and isinstance(value, dict)
                                                                  and value.get("type") == "disabled"):
                raise _bad(UNSUPPORTED[name], name)
        self.s.check_fields(req)
        check_text(req)
        tools = chat_tools_of(req.tools)
        choice, parallel = chat_tool_choice(req.tool_choice, bool(tools))
        user = (req.metadata or {}).get("user_id")
        try:
            params = SamplingParams(max_tokens=req.max_tokens, temperature=1.0 if req.temperature is None else
                                    req.temperature, top_p=1.0 if req.top_p is None else req.top_p,
                                    top_k=req.top_k or 0, stop=list(req.stop_sequences or []),
                                    user=user if isinstance(user, str) else None)
        except InvalidRequestError as e:
            is_stop = e.param == "stop" or (e.param is None and "stop" in e.message)
            raise _bad(e.message.replace("stop strings", "stop_sequences"),
                       "stop_sequences" if is_stop else (e.param or "body")) from None
        messages = chat_messages(req)
        # a final assistant turn is a prefill: the answer continues it (as Anthropic's API does)
        prefill = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
        return await self.s.prepare_chat(messages, params, None, tools, choice, parallel,
                                         continue_final_message=prefill, count_only=count_only)

    async def _count(self, req: MessagesRequest, raw: Request) -> Response:
        prompt_ids, _, _ = await self._render(req, count_only=True)
        return JSONResponse({"input_tokens": len(prompt_ids)})

    async def _create(self, req: MessagesRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        prompt_ids, params, tools = await self._render(req)
        mid = f"msg_{uuid.uuid4().hex}"
        gen = Generation(self.s, mid, prompt_ids, params, self.s._deadline(), req.stream, arrival)
        await gen.start()
        sequences = list(req.stop_sequences or [])
        if req.stream:
            return self.s._sse(self._stream(gen, tools, mid, sequences), [gen])
        finals = await self.s._collect([gen], raw)
        if finals is None:
            return Response(status_code=499)
        fo = final_output(finals[0], tools)
        inputs = [_object_or_none(c.arguments) for c in fo.calls]
        if any(x is None for x in inputs):
            # a call whose arguments are not a JSON object (tool_choice auto, cut by max_tokens): tool_use
            # needs an object, so the answer is returned as the text the model wrote
            fo.content, fo.calls, inputs = fo.raw, [], []
            fo.reason = "length" if fo.reason == "length" else "stop"
        content: list[dict[str, Any]] = []
        if fo.content or not fo.calls:
            content.append({"type": "text", "text": fo.content})
        for c, inp in zip(fo.calls, inputs):
            content.append({"type": "tool_use", "id": c.id, "name": c.name, "input": inp})
        reason, seq = stop_reason_of(fo.reason, fo.stop_reason, sequences)
        u = gen.usage()
        return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": self.s.model_name,
                             "content": content, "stop_reason": reason, "stop_sequence": seq,
                             "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                                       "cache_read_input_tokens": fo.num_cached_tokens}})

    async def _stream(self, gen: Generation, tools: Any, mid: str, sequences: list[str]) -> AsyncIterator[str]:
        def event(kind: str, **data: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps(dict(type=kind, **data), ensure_ascii=False)}\n\n"

        block = -1  # index of the open content block (-1: none yet)
        open_kind: Optional[str] = None  # "text" or "tool_use"
        call_block: dict[int, int] = {}  # tool call index -> its block index
        try:
            yield event("message_start", message={
                "id": mid, "type": "message", "role": "assistant", "model": self.s.model_name, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(gen.prompt_ids), "output_tokens": 0}})
            yield event("ping")
            async for ev in chat_events(gen, tools):
                if isinstance(ev, TextEvent):
                    if open_kind != "text":
                        if open_kind is not None:
                            yield event("content_block_stop", index=block)
                        block, open_kind = block + 1, "text"
                        yield event("content_block_start", index=block, content_block={"type": "text", "text": ""})
                    yield event("content_block_delta", index=block, delta={"type": "text_delta", "text": ev.text})
                elif isinstance(ev, CallStart):
                    if open_kind is not None:
                        yield event("content_block_stop", index=block)
                    block, open_kind = block + 1, "tool_use"
                    call_block[ev.index] = block
                    yield event("content_block_start", index=block, content_block={
                        "type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
                elif isinstance(ev, CallArgs):
                    yield event("content_block_delta", index=call_block[ev.index],
                                delta={"type": "input_json_delta", "partial_json": ev.text})
                elif isinstance(ev, Finish):
                    if open_kind is None:  # an empty answer is still one text block
                        block, open_kind = 0, "text"
                        yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                    yield event("content_block_stop", index=block)
                    reason, seq = stop_reason_of(ev.reason, ev.stop_reason, sequences)
                    yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": seq},
                                usage={"output_tokens": gen.completion_tokens})
                    yield event("message_stop")
        except (TokenmillError, EngineRequestError) as e:
            status = e.http_status if isinstance(e, TokenmillError) else 500
            msg = e.message if isinstance(e, TokenmillError) else str(e)
            yield event("error", error={"type": _ERROR_TYPES.get(status, "api_error"), "message": msg})
        finally:
            await gen.close()
