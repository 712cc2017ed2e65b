"""Structured output and tool calls through HTTP with the official `openai` client, on the default model
(issue #20): every output parses and validates; bad constraints are 400s naming the field."""
from __future__ import annotations

import json
import re
from enum import Enum
from typing import Optional

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: Optional[str] = Field(None, max_length=8)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    favorite: Color
    address: Address
    tags: list[str] = Field(max_length=3)


MSG = [{"role": "user", "content": "Describe a person called Ada who lives in Paris."}]


def test_parse_with_pydantic_model(real_url):
    r = _client(real_url).chat.completions.parse(model="SmolLM2-135M-Instruct", messages=MSG, response_format=Person,
                                                 temperature=0, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Person)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}},
    {"extra_body": {"guided_json": Person.model_json_schema()}},
    {"extra_body": {"guided_regex": r"[0-9]{3}-[a-z]{2}"}},
    {"extra_body": {"guided_choice": ["yes", "no", "maybe"]}},
    {"extra_body": {"guided_grammar": 'root ::= "A" ("b" | "c")+ "!"'}},
    {"extra_body": {"structured_outputs": {"json": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                    "required": ["n"]}}}},
])
def test_every_constraint_form_holds(real_url, body, stream):
    kw = dict(model="SmolLM2-135M-Instruct", messages=MSG, temperature=0, max_tokens=200, **body)
    c = _client(real_url)
    if stream:
        text, finish = "", None
        for ch in c.chat.completions.create(stream=True, **kw):
            for choice in ch.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    else:
        r = c.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop", (finish, text)
    extra = body.get("extra_body", {})
    rf = body.get("response_format")
    if rf is not None and rf["type"] == "json_object":
        assert isinstance(json.loads(text), dict)
    elif rf is not None:
        jsonschema.validate(json.loads(text), rf["json_schema"]["schema"])
    elif "guided_json" in extra:
        jsonschema.validate(json.loads(text), extra["guided_json"])
    elif "guided_regex" in extra:
        assert re.fullmatch(extra["guided_regex"], text), text
    elif "guided_choice" in extra:
        assert text in extra["guided_choice"]
    elif "guided_grammar" in extra:
        assert re.fullmatch(r"A[bc]+!", text), text
    else:
        jsonschema.validate(json.loads(text), extra["structured_outputs"]["json"])


def test_completions_endpoint_takes_constraints(real_url):
    r = _client(real_url).completions.create(model="SmolLM2-135M-Instruct", prompt="The answer is", max_tokens=20,
                                             temperature=0, extra_body={"guided_choice": ["42", "forty-two"]})
    assert r.choices[0].text in ("42", "forty-two") and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_logprobs_of_tokens_the_grammar_forbids_are_finite(real_url, route, stream):
    """A grammar that allows one token leaves the other top_logprobs at -inf, which JSON cannot carry: the
    server sends -9999.0 (vLLM's floor) instead of failing the request (found by the schemathesis fuzz)."""
    if route == "completions":
        body = {"prompt": "0", "guided_regex": "0", "logprobs": 3, "max_tokens": 3}
    else:
        body = {"messages": MSG, "guided_regex": "0", "logprobs": True, "top_logprobs": 3, "max_tokens": 3}
    r = httpx.post(f"{real_url}/v1/{'completions' if route == 'completions' else 'chat/completions'}",
                   json={**body, "stream": stream}, timeout=60)
    assert r.status_code == 200, r.text
    assert "Infinity" not in r.text and "NaN" not in r.text
    assert "-9999.0" in r.text  # the forbidden alternatives are there, at the floor


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
])
def test_bad_constraints_are_400_naming_the_field(real_url, body, param):
    r = httpx.post(real_url + "/v1/chat/completions", timeout=60,
                   json={"messages": MSG, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_unsatisfiable_within_max_tokens_ends_with_length(real_url):
    schema = {"type": "object", "properties": {"essay": {"type": "string", "minLength": 200}}, "required": ["essay"]}
    r = _client(real_url).chat.completions.create(model="SmolLM2-135M-Instruct", messages=MSG, max_tokens=10,
                                                  temperature=0, extra_body={"guided_json": schema})
    assert r.choices[0].finish_reason == "length"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, names=("get_weather", "get_time")):
    assert calls, "no tool call"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_required_and_named(real_url, choice):
    r = _client(real_url).chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME],
                                                  tool_choice=choice, temperature=0, max_tokens=120,
                                                  parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    names = ("get_time",) if isinstance(choice, dict) else ("get_weather", "get_time")
    _check_calls(ch.message.tool_calls, names)
    assert len(ch.message.tool_calls) == 1


def test_parallel_tool_calls_are_each_valid(real_url):
    """With parallel calls allowed the grammar admits several; a tiny model may repeat calls until max_tokens,
    and every complete call it made is returned, valid."""
    r = _client(real_url).chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME],
                                                  tool_choice="required", temperature=0, max_tokens=120)
    ch = r.choices[0]
    assert ch.finish_reason in ("tool_calls", "length"), ch
    _check_calls(ch.message.tool_calls)


def test_tool_calls_streamed_assemble_like_the_sdk(real_url):
    kw = dict(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
              temperature=0, max_tokens=120, parallel_tool_calls=False)
    c = _client(real_url)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in c.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    entry["id"] = d.id
                if d.function and d.function.name:
                    entry["name"] += d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
    assert finish == "tool_calls"
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == \
        [(w.function.name, json.loads(w.function.arguments)) for w in whole]
    assert all(v["id"] for v in calls.values())


def test_tool_round_trip(real_url):
    c = _client(real_url)
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER],
                                  tool_choice="required", temperature=0, max_tokens=120, parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None,
                      "tool_calls": [{"id": call.id, "type": "function",
                                      "function": {"name": call.function.name,
                                                   "arguments": call.function.arguments}}]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r2 = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=history, tools=[WEATHER],
                                   tool_choice="none", temperature=0, max_tokens=30)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls
