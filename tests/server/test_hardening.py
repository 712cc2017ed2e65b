"""Defects found by outside probes (issue #19), one test each: slow readers, bad Unicode, slow headers and
bodies, loose validation, text parts, default max_tokens, queue-time metrics, shutdown aborts."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tokenmill.server.app import startup_lines
from tokenmill.server.config import ServerConfig


def _raw_request(url: str, path: str, body: bytes, rcvbuf: int = 0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ---- 1. a client that stops reading a stream -------------------------------------------------------------

@pytest.mark.parametrize("stall_s, request_timeout_s", [(1.0, 600.0), (600.0, 1.5)])
def test_stream_client_that_stops_reading_is_aborted(fake, stall_s, request_timeout_s):
    url = fake.add_app(ServerConfig(stream_stall_timeout_s=stall_s, request_timeout_s=request_timeout_s),
                       sndbuf=4096)
    before = len(fake.engine.aborted)
    body = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 400, "stream": True,
                       "ignore_eos": True, "logprobs": 5}).encode()
    socks = [_raw_request(url, "/v1/completions", body, rcvbuf=1024) for _ in range(2)]
    try:
        # the engine would take 400 x 2 ms; the writes block long before that, and the stall (or the
        # request deadline, which also bounds a blocked write) aborts both requests
        assert _wait(lambda: len(fake.engine.aborted) >= before + 2, 20), fake.engine.aborted
        assert not any(rid.startswith("cmpl-") for rid in fake.engine.blocks)
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_stalled_stream_counted_in_metrics(fake):
    url = fake.add_app(ServerConfig(stream_stall_timeout_s=0.5), sndbuf=4096)
    body = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 400, "stream": True,
                       "ignore_eos": True, "logprobs": 5}).encode()
    s = _raw_request(url, "/v1/completions", body, rcvbuf=1024)
    try:
        assert _wait(lambda: 'reason="stalled"' in httpx.get(url + "/metrics").text, 20)
    finally:
        s.close()


# ---- 3. lone surrogates ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     "messages[0].content"),
    ("/v1/completions", '{"prompt": "ab", "max_tokens": 2, "stop": ["\\udc00"]}', "stop[0]"),
])
def test_lone_surrogate_is_400_and_connection_lives(real_url, path, body, param):
    with httpx.Client(base_url=real_url, timeout=60) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "surrogate" in err["message"], err
        assert "tokenizer" not in err["message"].lower()
        ok = c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1})  # same keep-alive connection
        assert ok.status_code == 200, ok.text


# ---- 4. slow headers and bodies ---------------------------------------------------------------------------

def test_slow_headers_and_bodies_are_cut_off(fake):
    url = fake.add_app(ServerConfig(read_timeout_s=1.0))
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        socks.append(s)
    silent = socket.create_connection((host, int(port)))  # sends nothing at all
    body = _raw_request(url, "/v1/completions", b"")  # headers promise a body...
    body.close()
    half = socket.create_connection((host, int(port)))
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # ...that never completes
    for s in socks + [silent, half]:
        s.settimeout(10)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b" 408 " in data.split(b"\r\n")[0], data[:200]
        s.close()
    assert httpx.get(url + "/health", timeout=5).status_code == 200


# ---- 5. the start-up line ----------------------------------------------------------------------------------

def test_startup_lines():
    assert startup_lines("127.0.0.1", 8000, "M", None) == ["tokenmill serving M on http://127.0.0.1:8000"]
    assert startup_lines("::1", 9, "M", None) == ["tokenmill serving M on http://[::1]:9"]
    lines = startup_lines("0.0.0.0", 8000, "M", None)
    assert lines[0] == "tokenmill serving M on http://0.0.0.0:8000"
    assert len(lines) == 2 and "WARNING" in lines[1] and "--api-key" in lines[1]
    assert len(startup_lines("0.0.0.0", 8000, "M", "secret")) == 1


# ---- 6. loose validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "tool", "tool_call_id": "c1"}]}, "messages[1].content"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, True]]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [True]}, "stop_token_ids"),
    ("/v1/completions", '{"prompt": "x", "slo": {"ttft_ms": Infinity}}', "slo.ttft_ms"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", {"prompt": "x", "top_k": 2 ** 63}, "top_k"),
    ("/v1/completions", {"prompt": "x", "priority": 2 ** 63}, "priority"),
])
def test_loose_values_are_400_naming_the_field(real_url, path, body, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(real_url + path, timeout=60, **kw)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()


# ---- 7. text content parts ----------------------------------------------------------------------------------

def test_text_parts_are_joined_with_newlines(real):
    proc = real.engine.processor
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "Hello\nworld"}]
    assert proc.apply_chat_template(parts) == proc.apply_chat_template(joined)


def test_text_parts_over_http_match_newline_join(real_url):
    def usage(content):
        r = httpx.post(real_url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    assert usage([{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]) == usage("Hello\nworld")


# ---- 8. a default for max_tokens -----------------------------------------------------------------------------

def test_max_tokens_default_caps_requests_without_max_tokens(fake):
    url = fake.add_app(ServerConfig(max_tokens_default=7))
    r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 7 and r.json()["choices"][0]["finish_reason"] == "length"
    r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "max_tokens": 9})
    assert r.json()["usage"]["completion_tokens"] == 9  # an explicit max_tokens wins


def test_streaming_eviction_default_max_tokens_is_bounded(real):
    from tokenmill.sampling_params import SamplingParams

    proc = real.engine.processor
    if proc.streaming_max_prompt is None:
        pytest.skip("the engine cannot re-rotate keys (no streaming eviction)")
    n = proc.validate([1, 2, 3], SamplingParams(max_tokens=None, kv_eviction="streaming"))
    assert n == proc.max_model_len


# ---- 9. queue time reaches /metrics from the real engine -----------------------------------------------------

def test_queue_time_histogram_from_real_engine(real_url):
    def count() -> float:
        for line in httpx.get(real_url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("tokenmill:request_queue_time_seconds_count"):
                return float(line.split()[-1])
        raise AssertionError("no queue time histogram")

    before = count()
    for stream in (False, True):
        r = httpx.post(real_url + "/v1/completions", timeout=60,
                       json={"prompt": "Hello", "max_tokens": 3, "stream": stream})
        assert r.status_code == 200
    assert count() == before + 2


# ---- 10. shutdown aborts and HEAD /health ----------------------------------------------------------------------

def test_head_health(fake_url):
    r = httpx.head(fake_url + "/health", timeout=5)
    assert r.status_code == 200


def test_requests_aborted_by_shutdown_are_errors_not_200(fake):
    url = fake.add_app(ServerConfig())
    results: dict = {}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "fake-model", "prompt": "x", "max_tokens": 500, "ignore_eos": True}
            first = asyncio.Event()

            async def stream() -> None:
                events = []
                async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    results["stream_status"] = r.status_code
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            first.set()
                results["events"] = events

            async def plain() -> None:
                r = await c.post("/v1/completions", json=body)
                results["plain"] = (r.status_code, r.json())

            tasks = [asyncio.create_task(stream())]
            await first.wait()
            fake.engine.stuck = True  # both requests stay in flight until the drain aborts them
            tasks.append(asyncio.create_task(plain()))
            for _ in range(200):
                apps = [s for s in _servings(fake) if s.in_flight >= 2]
                if apps:
                    break
                await asyncio.sleep(0.02)
            assert apps, "no app with the two requests in flight"
            try:
                await apps[0].drain(0.0)
            finally:
                fake.engine.stuck = False
            await asyncio.gather(*tasks)
            apps[0].draining = False

    fake.call(run(), timeout=60)
    assert results["plain"][0] == 503, results["plain"]
    assert results["plain"][1]["error"]["code"] == "aborted"
    events = results["events"]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert err["error"]["code"] == "aborted", events[-3:]
    assert not any((json.loads(e).get("choices") or [{}])[0].get("finish_reason") for e in events[:-2])


def _servings(live):
    return [s.config.app.state.serving for s in live._servers]


# ---- API surface (#20 section 3) --------------------------------------------------------------------------------

def test_tokenize_detokenize_and_model_card(real_url):
    r = httpx.post(real_url + "/tokenize", json={"prompt": "Hello world"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0
    d = httpx.post(real_url + "/detokenize", json={"tokens": body["tokens"]}, timeout=30)
    assert d.status_code == 200 and "Hello world" in d.json()["prompt"]
    chat = httpx.post(real_url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.status_code == 200 and chat.json()["count"] > 2
    bad = httpx.post(real_url + "/detokenize", json={"tokens": [10 ** 9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[0]"
    models = httpx.get(real_url + "/v1/models", timeout=30).json()["data"]
    card = httpx.get(real_url + "/v1/models/" + models[0]["id"], timeout=30)
    assert card.status_code == 200 and card.json()["id"] == models[0]["id"]
    assert httpx.get(real_url + "/v1/models/nope", timeout=30).status_code == 404


def test_unknown_route_is_a_404_that_says_so(fake_url):
    r = httpx.post(fake_url + "/v1/nonexistent", json={}, timeout=10)
    assert r.status_code == 404
    assert "no route POST /v1/nonexistent" in r.json()["error"]["message"]


@pytest.mark.parametrize("field, value", [("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["audio"]),
                                          ("functions", [{"name": "f"}]), ("prediction", {"type": "content"})])
def test_fields_the_server_cannot_honour_are_400(fake_url, field, value):
    r = httpx.post(fake_url + "/v1/chat/completions", timeout=10,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_unknown_fields_are_accepted_and_logged_once(fake_url, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="tokenmill.server"):
        for _ in range(2):
            r = httpx.post(fake_url + "/v1/chat/completions", timeout=10,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                 "some_new_field": 1})
            assert r.status_code == 200, r.text
    assert sum("some_new_field" in m for m in caplog.messages) == 1
