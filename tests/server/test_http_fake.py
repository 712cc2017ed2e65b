"""HTTP-layer tests over the fake engine: protocol shapes, SSE, errors, limits, auth, abort, metrics."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tokenmill.server.config import ServerConfig


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_chat_and_usage(fake, fake_url):
    c = _client(fake_url)
    r = c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=20, seed=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    ids = fake.engine.processor.apply_chat_template([{"role": "user", "content": "hi"}])
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 20 == len(r.choices[0].message.content.encode())
    assert r.usage.total_tokens == len(ids) + 20


def test_stream_equals_nonstream_and_usage(fake_url):
    c = _client(fake_url)
    kw = dict(model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=30, seed=11, n=2,
              temperature=1.0)
    full = c.chat.completions.create(**kw)
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for ch in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                assert choice.index not in finish
                finish[choice.index] = choice.finish_reason
    assert texts == {ch.index: ch.message.content for ch in full.choices}
    assert finish == {ch.index: ch.finish_reason for ch in full.choices}
    assert usage == full.usage


def test_completions_batch_echo_logprobs(fake, fake_url):
    c = _client(fake_url)
    r = c.completions.create(model="fake-model", prompt=["ab", "cde"], max_tokens=4, n=2, echo=True, logprobs=1,
                             extra_body={"ignore_eos": True}, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == "ab" + "aaaa" and r.choices[2].text == "cde" + "aaaa"
    lp = r.choices[2].logprobs
    assert lp.tokens == list("cdeaaaa") and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(range(7))
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 16
    r = c.completions.create(model="fake-model", prompt=[104, 105], max_tokens=2, echo=True, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == "hiaa"


def test_completions_stream_batch(fake_url):
    c = _client(fake_url)
    texts: dict[int, str] = {}
    for ch in c.completions.create(model="fake-model", prompt=["p", "q"], max_tokens=5, stream=True, seed=1,
                                   extra_body={"ignore_eos": True}):
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    full = c.completions.create(model="fake-model", prompt=["p", "q"], max_tokens=5, seed=1,
                                extra_body={"ignore_eos": True})
    assert texts == {ch.index: ch.text for ch in full.choices}


def test_stop_strings(fake_url):
    c = _client(fake_url)
    r = c.completions.create(model="fake-model", prompt="x", max_tokens=50, temperature=0, stop=["aaa"])
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"messages": "hi"}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 1000}', 400, "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, None),
    (b'{"messages": []}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}', 400, "logit_bias"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}', 400, "logit_bias"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": "nope"}', 404, "model"),
    (b'[1, 2]', 400, None),
    (b'null', 400, None),
])
def test_malformed_chat_bodies(fake_url, body, status, param):
    r = httpx.post(fake_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    err = _err(r, status)
    if param is not None:
        assert err["param"] == param, err


def test_client_mistakes_are_4xx(fake_url):
    u = fake_url + "/v1/completions"
    err = _err(httpx.post(u, json={"prompt": "x", "suffix": "y"}), 400)
    assert err["message"] == "suffix is not supported"
    err = _err(httpx.post(u, json={"prompt": "x" * 600, "max_tokens": 5}), 400)
    assert err["code"] == "context_length_exceeded"
    _err(httpx.post(u, json={"prompt": [1, 99999]}), 400)
    _err(httpx.post(u, json={"prompt": []}), 400)
    _err(httpx.post(u, json={"prompt": "x", "max_tokens": 0}), 400)
    _err(httpx.post(u, json={"prompt": ["a"] * 20, "n": 10}), 400)
    _err(httpx.post(u, content=b"x" * (65 * 1024), headers={"content-type": "application/json"}), 413)
    _err(httpx.get(fake_url + "/v1/nothing"), 404)
    _err(httpx.get(u), 405)
    r = httpx.post(u, json={"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "x"
    assert r.json()["usage"]["completion_tokens"] == 0


def test_models_version_health_page(fake_url):
    models = _client(fake_url).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert httpx.get(fake_url + "/version").json()["version"]
    assert httpx.get(fake_url + "/health").status_code == 200
    page = httpx.get(fake_url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "http" not in page.text.replace(
        "http-equiv", "")


def test_auth(fake):
    url = fake.add_app(ServerConfig(api_key="s3cret", served_model_name="served"))
    body = {"model": "served", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    _err(httpx.post(url + "/v1/chat/completions", json=body), 401)
    _err(httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    _err(httpx.get(url + "/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
    with pytest.raises(openai.AuthenticationError):
        _client(url, "bad").models.list()
    assert _client(url, "s3cret").models.list().data[0].id == "served"
    r = _client(url, "s3cret").chat.completions.create(**body)
    assert r.model == "served"
    for open_path in ("/health", "/metrics", "/", "/version"):
        assert httpx.get(url + open_path).status_code == 200


def test_engine_failure_is_500_and_server_keeps_serving(fake, fake_url):
    fake.engine.fail_ids.add("chatcmpl-")
    try:
        r = httpx.post(fake_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        err = _err(r, 500)
        assert "injected" in err["message"]
        with httpx.stream("POST", fake_url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    finally:
        fake.engine.fail_ids.clear()
    r = httpx.post(fake_url + "/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert r.status_code == 200
    assert httpx.get(fake_url + "/health").status_code == 200


def test_overload_429(fake, fake_url):
    fake.engine.max_waiting = 0
    try:
        r = httpx.post(fake_url + "/v1/completions", json={"prompt": "x", "max_tokens": 3})
        err = _err(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
    finally:
        fake.engine.max_waiting = None


def test_timeout_aborts(fake, fake_url):
    fake.engine.stuck = True
    try:
        r = httpx.post(fake_url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        time.sleep(0.4)
        health = httpx.get(fake_url + "/health")
    finally:
        fake.engine.stuck = False
    assert _err(r, 408)["type"] == "timeout_error"
    assert health.status_code in (200, 503)  # the request was aborted: nothing pending any more
    assert fake.engine.get_stats().kv_blocks_used == 0


def test_watchdog_notices_stuck_loop(fake, fake_url):
    async def hold() -> None:
        fake.engine.blocks["stuck-req"] = 1
        fake.engine.stuck = True

    fake.call(hold())
    try:
        fake.engine.stats.last_step_time = time.monotonic() - 5
        fake.engine.get_stats()
        r = httpx.get(fake_url + "/health")
        _err(r, 503)
        assert "stuck" in r.json()["error"]["message"]
    finally:
        fake.engine.stuck = False
        fake.engine.blocks.pop("stuck-req", None)
    assert httpx.get(fake_url + "/health").status_code == 200
    fake.engine.alive = False
    try:
        assert httpx.get(fake_url + "/health").status_code == 503
    finally:
        fake.engine.alive = True


def test_disconnect_aborts_and_frees(fake, fake_url):
    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            async def one(stream: bool) -> None:
                body = {"prompt": "x", "max_tokens": 400, "stream": stream, "extra": 1, "ignore_eos": True}
                if stream:
                    async with client.stream("POST", fake_url + "/v1/completions", json=body) as r:
                        async for _ in r.aiter_lines():
                            break
                else:
                    with pytest.raises(httpx.ReadTimeout):
                        await client.post(fake_url + "/v1/completions", json=body, timeout=0.2)

            await asyncio.gather(*[one(i % 2 == 0) for i in range(20)])

    n_aborted = len(fake.engine.aborted)
    asyncio.run(run())
    for _ in range(100):
        if fake.engine.get_stats().kv_blocks_used == 0:
            break
        time.sleep(0.02)
    assert fake.engine.get_stats().kv_blocks_used == 0
    assert len(fake.engine.aborted) - n_aborted == 20


def test_metrics(fake_url):
    _client(fake_url).completions.create(model="fake-model", prompt="m", max_tokens=3,
                                         extra_body={"ignore_eos": True})
    text = httpx.get(fake_url + "/metrics").text
    for name in ("tokenmill:request_success_total{finish_reason=\"length\"}", "tokenmill:time_to_first_token_seconds_bucket",
                 "tokenmill:time_per_output_token_seconds_count", "tokenmill:e2e_request_latency_seconds_sum",
                 "tokenmill:request_queue_time_seconds_count", "tokenmill:num_requests_running",
                 "tokenmill:num_requests_waiting", "tokenmill:kv_cache_blocks_used", "tokenmill:kv_cache_blocks_free",
                 "tokenmill:prefix_cache_hit_rate", "tokenmill:num_preemptions_total",
                 "tokenmill:prompt_tokens_total", "tokenmill:generation_tokens_total",
                 "tokenmill:http_responses_total"):
        assert name in text, name
