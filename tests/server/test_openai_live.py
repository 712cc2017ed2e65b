"""The official openai client against a live server over the real engine and the default model."""
from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from tokenmill.server.config import ServerConfig

MSG = [{"role": "user", "content": "Write one sentence about the sea."}]


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def _wait_blocks_free(url: str) -> float:
    used = -1.0
    for _ in range(200):
        used = _metric(url, "tokenmill:kv_cache_blocks_used")
        if used == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    return used


def test_chat_usage_logprobs_and_stream_equivalence(real, real_url):
    c = _client(real_url)
    model = c.models.list().data[0].id
    assert model == real.engine.model_name
    kw = dict(model=model, messages=MSG, max_tokens=12, seed=7, temperature=0.8, n=2)
    full = c.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    prompt_ids = real.engine.processor.apply_chat_template(MSG)
    assert full.usage.prompt_tokens == len(prompt_ids)
    per_choice = [len(ch.logprobs.content) for ch in full.choices]
    assert full.usage.completion_tokens == sum(per_choice)
    assert full.usage.total_tokens == len(prompt_ids) + sum(per_choice)
    for ch in full.choices:
        if ch.finish_reason == "length":
            assert len(ch.logprobs.content) == 12
        for item in ch.logprobs.content:
            assert item.logprob <= 0 and len(item.top_logprobs) == 3
            assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert "".join(t.token for t in ch.logprobs.content) == ch.message.content
    texts, usage = {0: "", 1: ""}, None
    for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == {ch.index: ch.message.content for ch in full.choices}
    assert usage == full.usage


def test_seed_reproducible_and_n(real_url):
    c = _client(real_url)
    kw = dict(model=None, messages=MSG, max_tokens=10, temperature=1.0, seed=123)
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    r = c.chat.completions.create(n=3, logprobs=True, **kw)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices)
    assert len({ch.message.content for ch in r.choices}) > 1  # independent samples


def test_stop_string(real_url):
    c = _client(real_url)
    base = c.chat.completions.create(model=None, messages=MSG, max_tokens=16, temperature=0)
    text = base.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = text.index(stop)
    r = c.chat.completions.create(model=None, messages=MSG, max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == text[:cut]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=None, messages=MSG, max_tokens=16, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == text[:cut]


def test_completions_echo_logprobs_token_prompts(real, real_url):
    c = _client(real_url)
    prompt = "The capital of France is"
    ids = real.engine.processor.tokenize(prompt)
    r = c.completions.create(model=None, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert ch.text.startswith(prompt) and r.usage.prompt_tokens == len(ids)
    assert len(ch.logprobs.tokens) == len(ids) + r.usage.completion_tokens
    assert ch.logprobs.token_logprobs[0] is None and all(x <= 0 for x in ch.logprobs.token_logprobs[1:])
    plain = c.completions.create(model=None, prompt=ids, max_tokens=5, temperature=0)
    assert ch.text == prompt + plain.choices[0].text
    batch = c.completions.create(model=None, prompt=[prompt, "One, two,"], max_tokens=5, temperature=0)
    assert [x.index for x in batch.choices] == [0, 1] and batch.choices[0].text == plain.choices[0].text
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model=None, prompt=prompt, max_tokens=5, temperature=0, stream=True) if x.choices)
    assert streamed == plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        c.completions.create(model=None, prompt=prompt, suffix="x", max_tokens=2)


def test_client_mistakes(real, real_url):
    c = _client(real_url)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=None, prompt="hi " * 600, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=None, messages=MSG, n=1000)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-17", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=None, prompt=[10 ** 7], max_tokens=2)
    r = httpx.post(real_url + "/v1/chat/completions", content=b'{"messages": [', headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(real_url + "/health").status_code == 200


def test_auth_real(real):
    url = real.add_app(ServerConfig(api_key="k-123"))
    with pytest.raises(openai.AuthenticationError):
        _client(url).models.list()
    with pytest.raises(openai.AuthenticationError):
        _client(url, "k-12").chat.completions.create(model=None, messages=MSG, max_tokens=2)
    assert _client(url, "k-123").chat.completions.create(model=None, messages=MSG, max_tokens=2).choices
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200


def test_disconnect_mid_stream_frees_blocks(real, real_url):
    async def run() -> None:
        sem = asyncio.Semaphore(25)
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> None:
                body = {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 200,
                        "stream": True, "ignore_eos": True}
                async with sem:
                    async with client.stream("POST", real_url + "/v1/chat/completions", json=body) as r:
                        assert r.status_code == 200
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: ")
                            if n >= 3:  # role chunk + some content: disconnect mid-answer
                                break

            await asyncio.gather(*[one(i) for i in range(50)])

    before = _metric(real_url, 'tokenmill:request_success_total{finish_reason="abort"}') if "abort" in httpx.get(
        real_url + "/metrics").text else 0.0
    asyncio.run(run())
    assert _wait_blocks_free(real_url) == 0
    assert _metric(real_url, "tokenmill:num_requests_running") == 0
    assert _metric(real_url, 'tokenmill:request_success_total{finish_reason="abort"}') - before == 50


@pytest.mark.slow
def test_overload_300_streams(real, real_url):
    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            async def one(i: int) -> str:
                body = {"prompt": f"Item {i}:", "max_tokens": 3, "stream": True, "ignore_eos": True}
                async with client.stream("POST", real_url + "/v1/completions", json=body) as r:
                    if r.status_code == 429:
                        assert r.headers["retry-after"]
                        assert (await r.aread()) and "error" in (await r.aread()).decode()
                        return "429"
                    assert r.status_code == 200
                    events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
                    assert events[-1] == "[DONE]" and '"finish_reason":"length"' in events[-2], events
                    return "ok"

            return await asyncio.gather(*[one(i) for i in range(300)])

    results = asyncio.run(run())
    assert set(results) <= {"ok", "429"}
    assert "ok" in results and "429" in results, results.count("ok")
    health = httpx.get(real_url + "/health")
    assert health.status_code == 200, health.text
    assert _wait_blocks_free(real_url) == 0
    r = _client(real_url).completions.create(model=None, prompt="Still alive?", max_tokens=2,
                                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_step_failure_fails_only_its_request(real_inproc, real_inproc_url, monkeypatch):
    real_url = real_inproc_url
    runner = real_inproc.engine.engine.core.runner
    real_execute = runner.execute_model
    fail = {"left": 0}

    def flaky(sched):
        # only steps that run a request: a cleanup-only step (finished ids, no tokens) may land between
        # the first request's 500 and the second request and must not swallow the injected fault
        if fail["left"] > 0 and sched.total_num_scheduled_tokens > 0:
            fail["left"] -= 1
            raise RuntimeError("injected device fault")
        return real_execute(sched)

    monkeypatch.setattr(runner, "execute_model", flaky)
    body = {"messages": MSG, "max_tokens": 4}
    fail["left"] = 1
    r = httpx.post(real_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 500 and "injected device fault" in r.json()["error"]["message"], r.text
    fail["left"] = 1
    with httpx.stream("POST", real_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "injected device fault" in events[-2] and '"error"' in events[-2]
    ok = _client(real_url).chat.completions.create(model=None, **body)
    assert ok.choices[0].message.content
    assert httpx.get(real_url + "/health").status_code == 200
    assert _wait_blocks_free(real_url) == 0
