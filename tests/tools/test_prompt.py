"""Tools in the prompt: the generic tool prompt and history conversion for templates without tool
support (rendered with SmolLM2's real template), and argument decoding for templates with it."""
from __future__ import annotations

import copy
import json

import pytest

from tests.tools.templates import LLAMA31, MISTRAL_V3, QWEN25, render
from tokenmill.tools.parsers import get_tool_parser
from tokenmill.tools.prompt import (format_call, generic_messages, needs_generic_prompt, render_tool_prompt,
                                    template_messages)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}

HISTORY = [
    {"role": "user", "content": "Weather in Paris and the time in Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Asia/Tokyo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21:04"}]},
]


def test_tool_prompt_lists_tools_and_format():
    p = render_tool_prompt([WEATHER, TIME])
    assert json.dumps({"name": "get_weather", "description": "Current weather in a city",
                       "parameters": WEATHER["function"]["parameters"]}) in p
    assert '"name": "get_time"' in p and "<tool_call>" in p and "answer the user directly" in p
    assert "one <tool_call> block for each" in p
    assert "at most one tool" in render_tool_prompt([WEATHER], parallel_tool_calls=False)
    assert "must call at least one tool" in render_tool_prompt([WEATHER], "required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert 'must call the tool "get_time"' in render_tool_prompt([WEATHER, TIME], named)
    assert '"parameters": <the arguments' in render_tool_prompt([WEATHER], parser_name="llama3_json")
    assert "[TOOL_CALLS]" in render_tool_prompt([WEATHER], parser_name="mistral")


def test_generic_messages_render_with_smollm2_template(smollm2_template):
    before = copy.deepcopy(HISTORY)
    msgs = generic_messages(HISTORY, [WEATHER, TIME])
    assert HISTORY == before  # not modified
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert all(isinstance(m["content"], str) and "tool_calls" not in m for m in msgs)
    assert msgs[3]["content"] == ("Tool result for call call_1 (get_weather): 18°C, cloudy\n"
                                  "Tool result for call call_2 (get_time): 21:04")
    text = render(smollm2_template, msgs)
    assert text.startswith("<|im_start|>system\nYou can call the following tools")
    assert "You are a helpful AI assistant named SmolLM" not in text  # our system message replaces it
    assert text.endswith("<|im_start|>assistant\n")
    # the assistant turn is written in the format the model is asked to use, and parses back
    content, calls = get_tool_parser("generic").parse(msgs[2]["content"])
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Asia/Tokyo"})]


def test_generic_messages_keep_the_system_message_and_skip_prompt_for_none():
    msgs = generic_messages([{"role": "system", "content": "Be brief."}] + HISTORY[:1], [WEATHER])
    assert msgs[0]["content"].startswith("Be brief.\n\nYou can call the following tools")
    assert len(msgs) == 2
    none = generic_messages(HISTORY, [WEATHER, TIME], tool_choice="none")
    assert none[0]["role"] == "user"  # no tool prompt, but the history is still converted
    assert none[2]["content"].startswith("Tool result for call call_1")
    # a tool message whose call is unknown keeps its own name field
    lone = generic_messages([{"role": "tool", "tool_call_id": "x", "name": "f", "content": "1"}])
    assert lone == [{"role": "user", "content": "Tool result for call x (f): 1"}]


@pytest.mark.parametrize("parser_name", ["generic", "hermes", "llama3_json", "mistral"])
def test_format_call_is_read_back_by_its_parser(parser_name):
    text = format_call("get_weather", '{"city": "Zürich", "n": [1, 2]}', parser_name)
    content, calls = get_tool_parser(parser_name).parse(text)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Zürich","n":[1,2]}')]


def test_template_messages_decode_arguments_for_tool_templates():
    before = copy.deepcopy(HISTORY)
    msgs = template_messages(HISTORY)
    assert HISTORY == before
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    for m in msgs[2:]:  # Qwen's template concatenates content strings
        m["content"] = m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
    text = render(QWEN25, msgs, tools=[WEATHER, TIME])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '"name": "get_time"' in text.split("\n</tools>")[0]
    # the arguments string rendered as-is would have been a quoted string: the bug this avoids
    assert '"arguments": "{' in render(QWEN25, copy.deepcopy(HISTORY[:2]), tools=[WEATHER])
    llama = render(LLAMA31, msgs[:2], tools=[WEATHER])
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in llama
    mistral = render(MISTRAL_V3, msgs[:1], tools=[WEATHER])
    assert "[AVAILABLE_TOOLS]" in mistral and "get_weather" in mistral


def test_needs_generic_prompt(smollm2_template):
    assert needs_generic_prompt(smollm2_template, "hermes")
    assert needs_generic_prompt(QWEN25, "generic")
    assert not needs_generic_prompt(QWEN25, "hermes")
    assert needs_generic_prompt(None, "hermes")
