"""The Responses and Anthropic Messages routes, and chat tools / structured output, through the clients agents
use (official `openai` and `anthropic` SDKs, LangChain's ChatOpenAI, litellm) against a live server on the
default model (issue #20). Every structured output and every tool call is validated against its schema."""
from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
           "required": ["city"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def _oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def _anth(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=300)


# ------------------------------------------------------------------------------------ OpenAI Responses


def test_responses_text_and_previous_response_id(real_url):
    c = _oai(real_url)
    r = c.responses.create(model=MODEL, input="Say hello.", instructions="Answer briefly.", max_output_tokens=8,
                           temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    got = c.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    r2 = c.responses.create(model=MODEL, input="And again.", previous_response_id=r.id, max_output_tokens=4,
                            temperature=0)
    assert r2.previous_response_id == r.id
    # the stored conversation (first input + first answer) is in the second prompt
    assert r2.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input="x", previous_response_id=r.id, max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id"
    r3 = c.responses.create(model=MODEL, input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r3.id)


def test_responses_streaming_event_sequence(real_url):
    c = _oai(real_url)
    events = list(c.responses.create(model=MODEL, input="Count to five.", max_output_tokens=8, temperature=0,
                                     stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == "".join(deltas) == events[-4].text
    plain = c.responses.create(model=MODEL, input="Count to five.", max_output_tokens=8, temperature=0)
    assert plain.output_text == final.output_text  # stream == non-stream
    with c.responses.stream(model=MODEL, input="Count to five.", max_output_tokens=8, temperature=0) as s:
        assert s.get_final_response().output_text == final.output_text


@pytest.mark.parametrize("stream", [False, True])
def test_responses_json_schema(real_url, stream):
    c = _oai(real_url)
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    kw = dict(model=MODEL, input="Invent a person.", text=fmt, max_output_tokens=40, temperature=0)
    if stream:
        with c.responses.stream(**kw) as s:
            text = s.get_final_response().output_text
    else:
        text = c.responses.create(**kw).output_text
    jsonschema.validate(json.loads(text), PERSON)
    r = c.responses.create(model=MODEL, input="Give JSON.", text={"format": {"type": "json_object"}},
                           max_output_tokens=30, temperature=0)
    assert r.status == "incomplete" or isinstance(json.loads(r.output_text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_tools_round_trip(real_url, stream):
    c = _oai(real_url)
    tools = [{"type": "function", "name": "get_weather", "description": "The weather of a city",
              "parameters": WEATHER, "strict": True}]
    kw = dict(model=MODEL, tools=tools, tool_choice="required", parallel_tool_calls=False, max_output_tokens=40,
              temperature=0)
    if stream:
        with c.responses.stream(input="What is the weather in Paris?", **kw) as s:
            first = s.get_final_response()
    else:
        first = c.responses.create(input="What is the weather in Paris?", **kw)
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    # the tool's output goes back with previous_response_id; the model answers in text
    answer = c.responses.create(model=MODEL, previous_response_id=first.id, tools=tools, max_output_tokens=12,
                                temperature=0, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                       "output": "sunny, 21 C"}])
    assert answer.output and answer.output[0].type in ("message", "function_call")
    assert answer.usage.input_tokens > first.usage.input_tokens
    # the same round trip without the store: the call item is sent back as input
    again = c.responses.create(model=MODEL, tools=tools, max_output_tokens=12, temperature=0, store=False, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}])
    assert again.output


def test_responses_unsupported_fields_are_400s(real_url):
    c = _oai(real_url)
    cases = [(dict(tools=[{"type": "web_search"}]), "tools[0].type"), (dict(background=True), "background"),
             (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]),
              "input[0].content[0]"),
             (dict(reasoning={"effort": "high"}), "reasoning"),
             (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}), "text.format")]
    for extra, param in cases:
        kw = dict(model=MODEL, input="x", max_output_tokens=2)
        kw.update(extra)
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(**kw)
        assert e.value.body["param"].startswith(param), (extra, e.value.body)


# ------------------------------------------------------------------------------------ Anthropic Messages


def test_anthropic_text_stream_and_count_tokens(real_url):
    c = _anth(real_url)
    msgs = [{"role": "user", "content": "Say hello."}]
    r = c.messages.create(model=MODEL, max_tokens=8, system="Answer briefly.", messages=msgs,
                          extra_body={"temperature": 0})
    assert r.type == "message" and r.role == "assistant" and r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens") and r.usage.output_tokens <= 8
    with c.messages.stream(model=MODEL, max_tokens=8, system="Answer briefly.", messages=msgs,
                           extra_body={"temperature": 0}) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == final.content[0].text == r.content[0].text  # stream == non-stream
    assert final.stop_reason == r.stop_reason
    n = c.messages.count_tokens(model=MODEL, system="Answer briefly.", messages=msgs).input_tokens
    assert n == r.usage.input_tokens
    stop = c.messages.create(model=MODEL, max_tokens=30, messages=[{"role": "user", "content": "Count: 1, 2, 3"}],
                             stop_sequences=["2"], extra_body={"temperature": 0})
    assert (stop.stop_reason, stop.stop_sequence) in (("stop_sequence", "2"), ("end_turn", None),
                                                      ("max_tokens", None))
    # a final assistant message is a prefill: the answer continues it (no end of turn after it)
    prefill = msgs + [{"role": "assistant", "content": "Hello! My name is"}]
    closed = httpx.post(real_url + "/tokenize", json={"messages": prefill, "add_generation_prompt": False}).json()
    cont = c.messages.create(model=MODEL, max_tokens=3, messages=prefill, extra_body={"temperature": 0})
    assert cont.usage.input_tokens < closed["count"] and cont.content[0].text
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://x"}}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert e.value.body["error"]["param"] == "messages[0].content[0]"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use_any_and_tool_result_round_trip(real_url, stream):
    c = _anth(real_url)
    tools = [{"name": "get_weather", "description": "The weather of a city", "input_schema": WEATHER}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, max_tokens=60, tools=tools, messages=msgs,
              tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body={"temperature": 0})
    if stream:
        with c.messages.stream(**kw) as s:
            r = s.get_final_message()
    else:
        r = c.messages.create(**kw)
    uses = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, WEATHER)
    answer = c.messages.create(model=MODEL, max_tokens=12, tools=tools, extra_body={"temperature": 0}, messages=msgs + [
        {"role": "assistant", "content": r.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny, 21 C"}]}])
    assert answer.content and answer.usage.input_tokens > r.usage.input_tokens


def test_anthropic_named_tool_and_x_api_key(real):
    from tokenmill.server.config import ServerConfig

    url = real.add_app(ServerConfig(request_timeout_s=120.0, api_key="k3y"))
    tools = [{"name": "get_weather", "description": "The weather of a city", "input_schema": WEATHER}]
    r = anthropic.Anthropic(base_url=url, api_key="k3y", max_retries=0).messages.create(
        model=MODEL, max_tokens=60, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Paris?"}], extra_body={"temperature": 0})
    jsonschema.validate(next(b for b in r.content if b.type == "tool_use").input, WEATHER)
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models", headers={"x-api-key": "k3y"}).status_code == 200


# ------------------------------------------------------------------------------------ LangChain, litellm


class Weather(BaseModel):
    """The weather of a city."""

    city: str = Field(max_length=20)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


def _chat_openai(url: str, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=url + "/v1", api_key="none", model=MODEL, temperature=0, max_retries=0, **kw)


def test_langchain_bind_tools_round_trip(real_url):
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = _chat_openai(real_url, max_tokens=60)
    question = HumanMessage("What is the weather in Paris?")
    call_msg = llm.bind_tools([Weather], tool_choice="any", parallel_tool_calls=False).invoke([question])
    assert len(call_msg.tool_calls) == 1 and call_msg.tool_calls[0]["name"] == "Weather"
    Weather.model_validate(call_msg.tool_calls[0]["args"])
    answer = _chat_openai(real_url, max_tokens=12).bind_tools([Weather]).invoke(
        [question, call_msg, ToolMessage("sunny, 21 C", tool_call_id=call_msg.tool_calls[0]["id"])])
    assert answer.content or answer.tool_calls


@pytest.mark.parametrize("method", ["function_calling", "json_mode", "json_schema"])
def test_langchain_with_structured_output(real_url, method):
    llm = _chat_openai(real_url, max_tokens=60)
    prompt = "Invent a person. Answer in JSON with the keys name and age."
    if method == "json_mode":
        # json_mode sends no schema (OpenAI's contract: any JSON object): the output is a dict
        out = llm.with_structured_output(method="json_mode").invoke(prompt)
        assert isinstance(out, dict)
        return
    out = llm.with_structured_output(Person, method=method).invoke(prompt)
    assert isinstance(out, Person)
    Person.model_validate(out.model_dump())


def test_litellm_tools_required(real_url, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network on import
    import litellm

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                               "parameters": WEATHER}}]
    r = litellm.completion(model=f"openai/{MODEL}", api_base=real_url + "/v1", api_key="none", tools=tools,
                           tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0,
                           messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)
    follow = litellm.completion(model=f"openai/{MODEL}", api_base=real_url + "/v1", api_key="none", tools=tools,
                                max_tokens=12, temperature=0, messages=[
                                    {"role": "user", "content": "What is the weather in Paris?"},
                                    r.choices[0].message.model_dump(exclude_none=True),
                                    {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}])
    assert follow.choices[0].message.content is not None or follow.choices[0].message.tool_calls


# ------------------------------------------------------------------------------------ chat extras


def test_chat_prompt_logprobs_every_token_even_after_a_cached_prefix(real_url):
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "A fairly long question about the history of Paris, "
                                                     "the capital of France, and its bridges? " * 3}]}
    httpx.post(real_url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()  # fills the cache
    r = httpx.post(real_url + "/v1/chat/completions", json=dict(body, prompt_logprobs=1), timeout=120).json()
    plps, n = r["prompt_logprobs"], r["usage"]["prompt_tokens"]
    assert len(plps) == n and plps[0] is None and all(p is not None for p in plps[1:])
    assert all(1 <= len(p) <= 2 and all(v["logprob"] <= 0 for v in p.values()) for p in plps[1:])
    plain = httpx.post(real_url + "/v1/chat/completions", json=dict(body, prompt_logprobs=0), timeout=120).json()
    chunks = []
    with httpx.stream("POST", real_url + "/v1/chat/completions", timeout=120,
                      json=dict(body, prompt_logprobs=0, stream=True)) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert chunks[0]["prompt_logprobs"] == plain["prompt_logprobs"]  # stream == non-stream, first chunk only
    assert len(plain["prompt_logprobs"]) == n and all("prompt_logprobs" not in c for c in chunks[1:])


def test_chat_continue_final_message_and_template_kwargs(real_url):
    c = _oai(real_url)
    msgs = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "My favourite color is"}]
    cont = httpx.post(real_url + "/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0,
                                  extra_body={"continue_final_message": True, "add_generation_prompt": False})
    # the open assistant turn is continued: the prompt ends with its text (no end-of-turn token after it)
    assert r.usage.prompt_tokens < cont["count"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=3,
                                  extra_body={"continue_final_message": True})
    assert e.value.body["param"] == "continue_final_message"
    r = c.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=2,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content is not None
