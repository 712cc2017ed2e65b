"""Responses and Messages request mapping without a model: input items / content blocks to chat messages, tools
and tool_choice, text.format, stop reasons, the bounded response store, and the 400s naming the field."""
from __future__ import annotations

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.server import messages as A
from tokenmill.server import responses as R
from tokenmill.server.chat_core import ConversationStore


def _param(fn, *args) -> str:
    with pytest.raises(InvalidRequestError) as e:
        fn(*args)
    return e.value.param


def test_responses_input_items_become_chat_messages():
    assert R.input_messages("hi") == [{"role": "user", "content": "hi"}]
    msgs = R.input_messages([
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
    ])
    assert msgs == [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"x":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]


def test_responses_unsupported_inputs_name_the_field():
    assert _param(R.input_messages, [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]) \
        == "input[0].content[0]"
    assert _param(R.input_messages, [{"type": "reasoning", "summary": []}]) == "input[0].type"
    assert _param(R.input_messages, [{"type": "item_reference", "id": "x"}]) == "input[0].type"
    assert _param(R.input_messages, [{"role": "tool", "content": "x"}]) == "input[0].role"
    assert _param(R.input_messages, [{"type": "function_call", "name": "f", "arguments": "{}"}]) \
        == "input[0].call_id"
    assert _param(R.chat_tools_of, [{"type": "web_search"}]) == "tools[0].type"
    assert _param(R.chat_tools_of, [{"type": "function"}]) == "tools[0].name"
    assert _param(R.chat_tool_choice, {"type": "file_search"}) == "tool_choice"
    assert _param(R.chat_tool_choice, "sometimes") == "tool_choice"
    assert _param(R.text_constraint, {"format": {"type": "yaml"}}) == "text.format.type"
    assert _param(R.text_constraint, {"format": {"type": "json_schema", "name": "x"}}) == "text.format.schema"
    assert _param(R.text_constraint, {"format": {"type": "text"}, "other": 1}) == "text.other"


def test_responses_tools_and_format_map_to_the_chat_machinery():
    tools = R.chat_tools_of([{"type": "function", "name": "f", "description": "d",
                              "parameters": {"type": "object"}, "strict": True}])
    assert tools == [{"type": "function", "function": {"name": "f", "description": "d",
                                                       "parameters": {"type": "object"}}}]
    assert R.chat_tool_choice({"type": "function", "name": "f"}) == {"type": "function", "function": {"name": "f"}}
    assert R.chat_tool_choice("required") == "required"
    assert R.text_constraint(None) is None and R.text_constraint({"format": {"type": "text"}}) is None
    assert R.text_constraint({"format": {"type": "json_object"}}).json_object
    so = R.text_constraint({"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}}})
    assert so.json is not None


def test_messages_blocks_become_chat_messages():
    req = A.MessagesRequest.model_validate({
        "max_tokens": 5, "system": [{"type": "text", "text": "sys"}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "let me see"},
                                              {"type": "tool_use", "id": "t1", "name": "w", "input": {"c": "P"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                         {"type": "text", "text": "thanks"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "is_error": True,
                                          "content": [{"type": "text", "text": "boom"}]}]}]})
    assert A.chat_messages(req) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "let me see", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "w", "arguments": '{"c": "P"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: boom"},
    ]


def test_messages_unsupported_blocks_tools_and_choices_name_the_field():
    def conv(content, role="user"):
        return A.chat_messages(A.MessagesRequest.model_validate(
            {"max_tokens": 5, "messages": [{"role": role, "content": content}]}))

    assert _param(conv, [{"type": "image", "source": {}}]) == "messages[0].content[0]"
    assert _param(conv, [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]) == "messages[0].content[0]"
    assert _param(conv, [{"type": "thinking", "thinking": "x"}], "assistant") == "messages[0].content[0]"
    assert _param(A.chat_tools_of, [{"type": "web_search_20250305", "name": "web_search"}]) == "tools[0].type"
    assert _param(A.chat_tools_of, [{"name": "f"}]) == "tools[0].input_schema"
    assert _param(A.chat_tool_choice, {"type": "tool"}, True) == "tool_choice.name"
    assert _param(A.chat_tool_choice, {"type": "maybe"}, True) == "tool_choice.type"
    assert A.chat_tool_choice(None, True) == ("auto", None)
    assert A.chat_tool_choice({"type": "any", "disable_parallel_tool_use": True}, True) == ("required", False)
    assert A.chat_tool_choice({"type": "tool", "name": "f"}, True) == (
        {"type": "function", "function": {"name": "f"}}, None)
    assert A.chat_tool_choice({"type": "none"}, True) == ("none", None)


def test_messages_stop_reasons():
    assert A.stop_reason_of("tool_calls", None, []) == ("tool_use", None)
    assert A.stop_reason_of("length", None, []) == ("max_tokens", None)
    assert A.stop_reason_of("stop", "END", ["END"]) == ("stop_sequence", "END")
    assert A.stop_reason_of("stop", 2, ["END"]) == ("end_turn", None)
    assert A.stop_reason_of("stop", None, []) == ("end_turn", None)


def test_conversation_store_is_a_bounded_lru():
    store = ConversationStore(max_bytes=300)
    body = {"id": "x", "pad": "a" * 50}
    assert store.put("a", body, [{"role": "user", "content": "1"}])
    assert store.put("b", body, [])
    assert store.get("a") is not None  # a is now the most recent
    assert store.put("c", body, [])
    assert store.put("d", body, [])
    assert store.used <= 300
    assert store.get("b") is None and store.get("a") is not None  # the least recent went first
    assert not store.put("huge", {"pad": "a" * 400}, [])
    assert store.delete("a") and not store.delete("a")
    assert ConversationStore(0).put("z", {}, []) is False
