"""/v1/responses and /v1/messages over the fake engine (fast): shapes, event sequences, the store, error bodies
(OpenAI's on /v1/responses, Anthropic's on /v1/messages) and x-api-key auth."""
from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tokenmill.server.config import ServerConfig


def _events(url: str, path: str, body: dict) -> list[tuple[str, dict]]:
    out, kind = [], None
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == kind
                out.append((kind, data))
    return out


def test_responses_create_get_delete(fake_url):
    c = openai.OpenAI(base_url=fake_url + "/v1", api_key="x", max_retries=0)
    r = c.responses.create(model="fake-model", input="hi", instructions="sys", max_output_tokens=6,
                           metadata={"k": "v"}, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and len(r.output_text.encode()) == 6 and r.metadata == {"k": "v"}
    assert r.instructions == "sys" and r.max_output_tokens == 6 and r.store is True
    assert c.responses.retrieve(r.id).output_text == r.output_text
    r2 = c.responses.create(model="fake-model", input="more", previous_response_id=r.id, max_output_tokens=2)
    # the prompt holds the first turn (without its instructions) and the answer
    assert r2.usage.input_tokens > r.usage.input_tokens - len("sys") + r.usage.output_tokens
    d = httpx.delete(fake_url + f"/v1/responses/{r.id}").json()
    assert d == {"id": r.id, "object": "response.deleted", "deleted": True}
    nf = httpx.get(fake_url + f"/v1/responses/{r.id}")
    assert nf.status_code == 404 and nf.json()["error"]["code"] == "not_found"  # OpenAI: invalid_request_error
    assert httpx.delete(fake_url + f"/v1/responses/{r.id}").status_code == 404


def test_responses_stream_events(fake_url):
    evs = _events(fake_url, "/v1/responses", {"input": "hi", "max_output_tokens": 5, "stream": True, "temperature": 0})
    kinds = [k for k, _ in evs]
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * (len(kinds) - 8)
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    text = "".join(d["delta"] for k, d in evs if k == "response.output_text.delta")
    final = evs[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == text and final["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 5


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0]"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": []}, "input"),
])
def test_responses_400s_name_the_field(fake_url, body, param):
    r = httpx.post(fake_url + "/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_messages_shapes_and_stream_events(fake_url):
    c = anthropic.Anthropic(base_url=fake_url, api_key="x", max_retries=0)
    r = c.messages.create(model="fake-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                          extra_body={"temperature": 0})
    assert r.type == "message" and r.stop_reason == "max_tokens" and len(r.content[0].text.encode()) == 4
    assert r.usage.output_tokens == 4
    evs = _events(fake_url, "/v1/messages", {"max_tokens": 4, "stream": True, "temperature": 0,
                                             "messages": [{"role": "user", "content": "hi"}]})
    kinds = [k for k, _ in evs]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    assert evs[-2][1]["delta"]["stop_reason"] == "max_tokens" and evs[-2][1]["usage"]["output_tokens"] == 4
    assert c.messages.count_tokens(model="fake-model", messages=[{"role": "user", "content": "hi"}]).input_tokens \
        == r.usage.input_tokens


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "messages[0].content[0]"),
    ({"max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled"}},
     "thinking"),
    ({"max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5}, "temperature"),
    ({"max_tokens": 2, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
    ({"max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "stop_sequences": [""]}, "stop_sequences"),
])
def test_messages_errors_in_anthropic_shape(fake_url, body, param):
    r = httpx.post(fake_url + "/v1/messages", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"] == param
    bad = httpx.post(fake_url + "/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["type"] == "error"


def test_x_api_key_auth(fake):
    url = fake.add_app(ServerConfig(api_key="s3cret"))
    body = {"max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": "s3cret"}).status_code == 200
    assert httpx.post(url + "/v1/messages", json=body,
                      headers={"authorization": "Bearer s3cret"}).status_code == 200
    r = httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": "nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url + "/v1/responses", json={"input": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape there
