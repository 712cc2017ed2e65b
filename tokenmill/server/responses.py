"""OpenAI's Responses API (`POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`) over the chat path.

The input (a string, or a list of message / function_call / function_call_output items) becomes chat
messages, `instructions` a system message first, `text.format` the structured-output constraint and function
`tools` the chat tool machinery (grammar-enforced when a call is required). A finished response is kept in a
bounded in-memory store (unless `store: false`) so `previous_response_id` can continue its conversation.
Streams use the official event sequence (`response.created` ... `response.completed`).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.server.chat_core import (CallArgs, CallStart, ConversationStore, Finish, TextEvent, chat_events,
                                        final_output)
from tokenmill.server.constraints import remap
from tokenmill.server.generation import EngineRequestError, Generation, stream_error
from tokenmill.server.serving import OpenAIServing, check_text

# fields of the Responses API tokenmill cannot honour: a 400 naming them
UNSUPPORTED = {
    "conversation": "`conversation` objects are not supported: use previous_response_id",
    "prompt": "reusable prompt templates (`prompt`) are not supported: send the input itself",
    "max_tool_calls": "`max_tool_calls` is not supported",
    "top_logprobs": "`top_logprobs` is not supported on /v1/responses (use /v1/chat/completions)",
    "audio": "audio output is not supported: this server serves a text-only model",
}
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    text: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    previous_response_id: Optional[str] = None
    store: bool = True
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    truncation: Optional[Literal["disabled", "auto"]] = None
    background: Optional[bool] = None
    reasoning: Optional[dict[str, Any]] = None
    include: Optional[list[str]] = None
    service_tier: Optional[str] = None


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _part_text(part: Any, param: str) -> str:
    if not isinstance(part, dict):
        raise _bad(f"{param} must be an object", param)
    kind = part.get("type")
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    if kind in ("input_image", "input_file", "input_audio"):
        raise _bad(f"{param}: {kind} parts are not supported: this server serves a text-only model", param)
    raise _bad(f"{param}: unsupported content part type {kind!r} (use input_text)", param)


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_part_text(p, f"{param}[{j}]") for j, p in enumerate(content))
    raise _bad(f"{param} must be a string or a list of input_text parts", param)


def input_messages(inp: Union[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The Responses `input` as chat template messages (function calls as assistant tool_calls, their
    outputs as tool messages)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    msgs: list[dict[str, Any]] = []
    for i, item in enumerate(inp):
        p = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{p}.role must be user, system, developer or assistant, got {role!r}", f"{p}.role")
            msgs.append({"role": role, "content": _content_text(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _bad(f"{p}.{key} must be a string", f"{p}.{key}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant" and "tool_calls" in msgs[-1]:
                msgs[-1]["tool_calls"].append(call)
            elif msgs and msgs[-1]["role"] == "assistant":
                msgs[-1]["tool_calls"] = [call]
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{p}.call_id must be a string", f"{p}.call_id")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": _content_text(item.get("output"), f"{p}.output")})
        elif kind == "item_reference":
            raise _bad(f"{p}: item references are not supported: send the item itself, or previous_response_id",
                       f"{p}.type")
        else:
            raise _bad(f"{p}.type {kind!r} is not supported (use message, function_call or function_call_output)",
                       f"{p}.type")
    return msgs


def chat_tools_of(tools: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    """Responses function tools ({type, name, description, parameters, strict}) as chat tools."""
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise _bad(f"tools[{i}]: built-in tool {kind!r} is not supported (only function tools are)",
                       f"tools[{i}].type")
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise _bad(f"tools[{i}].name is required", f"tools[{i}].name")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise _bad(f"tool_choice {choice!r} is not one of auto, none, required", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise _bad("tool_choice.name is required", "tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if isinstance(choice, dict) else type(choice).__name__
    raise _bad(f"tool_choice of type {kind!r} is not supported (auto, none, required or a function)",
               "tool_choice")


def text_constraint(text: Optional[dict[str, Any]]) -> Optional[StructuredOutputsParams]:
    """`text.format` as a structured-output constraint (text: none)."""
    if text is None:
        return None
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise _bad(f"text.{unknown[0]} is not supported", f"text.{unknown[0]}")
    if text.get("verbosity") not in (None, "medium"):
        raise _bad("text.verbosity is not supported (only medium)", "text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    try:
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            schema = fmt.get("schema")
            if not isinstance(schema, dict):
                raise _bad("text.format.schema is required (a JSON schema object)", "text.format.schema")
            return StructuredOutputsParams(json=schema)
    except InvalidRequestError as e:
        raise remap(e, "text.format") from None
    raise _bad(f"text.format.type {kind!r} is not supported (use text, json_object or json_schema)",
               "text.format.type")


class ResponsesServing:
    """The /v1/responses handlers of one server."""

    def __init__(self, serving: OpenAIServing, store_bytes: int):
        self.s = serving
        self.store = ConversationStore(store_bytes)

    def _check(self, req: ResponsesRequest) -> None:
        self.s.check_model(req.model)
        for name, value in (req.model_extra or {}).items():
            if name in UNSUPPORTED and value is not None:
                raise _bad(UNSUPPORTED[name], name)
        self.s.check_fields(req)
        check_text(req)
        if req.background:
            raise _bad("background responses are not supported: use stream or wait for the answer", "background")
        if req.reasoning is not None and any(v is not None for v in req.reasoning.values()):
            raise _bad("reasoning options are not supported: tokenmill runs no reasoning mode", "reasoning")
        if req.include:
            raise _bad(f"include {req.include[0]!r} is not supported", "include")
        if req.truncation == "auto":
            raise _bad("truncation auto is not supported: a too-long input is a 400 (truncation disabled)",
                       "truncation")

    def _params(self, req: ResponsesRequest) -> SamplingParams:
        so = text_constraint(req.text)
        return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, max_tokens=req.max_output_tokens,
                              user=req.user, structured_outputs=so)

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self._check(req)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            prev = self.store.get(req.previous_response_id)
            if prev is None:
                raise _bad(f"previous response {req.previous_response_id!r} not found (it was stored with "
                           "store=false, deleted, or evicted from the store)", "previous_response_id")
            history = [dict(m) for m in prev[1]]
        if isinstance(req.input, list) and not req.input and not history:
            raise _bad("input must not be empty", "input")
        conversation = history + input_messages(req.input)
        messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
        params = self._params(req)
        source = "text.format" if params.structured_outputs is not None else None
        prompt_ids, params, tools = await self.s.prepare_chat(
            messages, params, source, chat_tools_of(req.tools), chat_tool_choice(req.tool_choice),
            req.parallel_tool_calls, param_prefix="input")
        rid = f"resp_{uuid.uuid4().hex}"
        gen = Generation(self.s, rid, prompt_ids, params, self.s._deadline(), req.stream, arrival)
        await gen.start()
        base = self._base(rid, req)
        if req.stream:
            return self.s._sse(self._stream(gen, tools, base, conversation, req.store), [gen])
        finals = await self.s._collect([gen], raw)
        if finals is None:
            return Response(status_code=499)
        fo = final_output(finals[0], tools)
        output = []
        if fo.content or not fo.calls:
            output.append(_message_item(f"msg_{uuid.uuid4().hex}", fo.content, _item_status(fo.reason)))
        output += [_call_item(c.id, c.name, c.arguments) for c in fo.calls]
        body = self._finish(base, output, fo.reason, gen, fo.num_cached_tokens)
        self._remember(body, conversation, output, req.store)
        return JSONResponse(body)

    def _base(self, rid: str, req: ResponsesRequest) -> dict[str, Any]:
        fmt = (req.text or {}).get("format") or {"type": "text"}
        return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "error": None, "incomplete_details": None, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "model": self.s.model_name, "output": [],
                "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id, "reasoning": None, "store": req.store,
                "temperature": 1.0 if req.temperature is None else req.temperature, "text": {"format": fmt},
                "tool_choice": req.tool_choice or "auto", "tools": list(req.tools or []),
                "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": None,
                "user": req.user, "metadata": dict(req.metadata or {})}

    def _finish(self, base: dict[str, Any], output: list[dict[str, Any]], reason: Optional[str], gen: Generation,
                cached: int) -> dict[str, Any]:
        u = gen.usage()
        body = dict(base, output=output, status="incomplete" if reason == "length" else "completed",
                    usage={"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
                           "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                           "total_tokens": u.total_tokens})
        if reason == "length":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def _remember(self, body: dict[str, Any], conversation: list[dict[str, Any]], output: list[dict[str, Any]],
                  store: bool) -> None:
        if not store:
            return
        turn: dict[str, Any] = {"role": "assistant", "content": "".join(
            p["text"] for it in output if it["type"] == "message" for p in it["content"])}
        calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"],
                                                                        "arguments": it["arguments"]}}
                 for it in output if it["type"] == "function_call"]
        if calls:
            turn["tool_calls"] = calls
            turn["content"] = turn["content"] or None
        self.store.put(body["id"], body, conversation + [turn])

    async def _stream(self, gen: Generation, tools: Any, base: dict[str, Any], conversation: list[dict[str, Any]],
                      store: bool) -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **data: Any) -> str:
            nonlocal seq
            seq += 1
            return _sse_event(kind, dict(type=kind, sequence_number=seq - 1, **data))

        output: list[dict[str, Any]] = []
        msg: Optional[dict[str, Any]] = None  # the open message item
        calls: dict[int, dict[str, Any]] = {}  # tool call index -> its open function_call item
        try:
            yield event("response.created", response=base)
            yield event("response.in_progress", response=base)
            async for ev in chat_events(gen, tools):
                if isinstance(ev, TextEvent):
                    if msg is None:
                        msg = _message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress")
                        output.append(msg)
                        yield event("response.output_item.added", output_index=len(output) - 1,
                                    item=dict(msg, content=[]))
                        yield event("response.content_part.added", item_id=msg["id"], output_index=len(output) - 1,
                                    content_index=0, part=_text_part(""))
                    msg["content"][0]["text"] += ev.text
                    yield event("response.output_text.delta", item_id=msg["id"], output_index=output.index(msg),
                                content_index=0, delta=ev.text, logprobs=[])
                elif isinstance(ev, CallStart):
                    item = dict(_call_item(ev.id, ev.name, ""), status="in_progress")
                    calls[ev.index] = item
                    output.append(item)
                    yield event("response.output_item.added", output_index=len(output) - 1, item=dict(item))
                elif isinstance(ev, CallArgs):
                    item = calls[ev.index]
                    item["arguments"] += ev.text
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=output.index(item), delta=ev.text)
                elif isinstance(ev, Finish):
                    status = _item_status(ev.reason)
                    if msg is None and not calls:  # an empty answer is still one message
                        msg = _message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress")
                        output.append(msg)
                        yield event("response.output_item.added", output_index=0, item=dict(msg, content=[]))
                        yield event("response.content_part.added", item_id=msg["id"], output_index=0,
                                    content_index=0, part=_text_part(""))
                    for k, item in enumerate(output):
                        item["status"] = status
                        if item is msg:
                            text = msg["content"][0]["text"]
                            yield event("response.output_text.done", item_id=msg["id"], output_index=k,
                                        content_index=0, text=text, logprobs=[])
                            yield event("response.content_part.done", item_id=msg["id"], output_index=k,
                                        content_index=0, part=_text_part(text))
                        else:
                            yield event("response.function_call_arguments.done", item_id=item["id"],
                                        output_index=k, name=item["name"], arguments=item["arguments"])
                        yield event("response.output_item.done", output_index=k, item=item)
                    body = self._finish(base, output, ev.reason, gen, ev.num_cached_tokens)
                    self._remember(body, conversation, output, store)
                    # response.completed even when cut by max_output_tokens (status "incomplete" in the body):
                    # the openai SDK's stream helper and other clients wait for this event
                    yield event("response.completed", response=body)
        except (TokenmillError, EngineRequestError) as e:
            err = stream_error(e)["error"]
            yield event("error", code=str(err.get("code") or err["type"]), message=err["message"],
                        param=err.get("param"))
        finally:
            await gen.close()

    def get(self, rid: str) -> dict[str, Any]:
        item = self.store.get(rid)
        if item is None:
            raise NotFound(f"no stored response {rid!r} (stored with store=false, deleted, or evicted)")
        return item[0]

    def delete(self, rid: str) -> dict[str, Any]:
        if not self.store.delete(rid):
            raise NotFound(f"no stored response {rid!r} (stored with store=false, deleted, or evicted)")
        return {"id": rid, "object": "response.deleted", "deleted": True}


class NotFound(InvalidRequestError):
    http_status = 404

    def __init__(self, message: str):
        super().__init__(message, param="response_id", code="not_found")


def _item_status(reason: Optional[str]) -> str:
    return "incomplete" if reason == "length" else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": [_text_part(text)]}


def _call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}


def _sse_event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
