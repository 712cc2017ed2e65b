"""The router over 2 real `tokenmill serve` backends (the default model) on 127.0.0.1, and
`tokenmill serve --data-parallel-size 2`: prefix routing keeps a system prompt on one backend, streams and
cancels pass through, a killed backend is routed around, DP replicas give the single engine's greedy output.
Slow: each backend loads the model in its own processes."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import pytest

from tests.router.procs import BACKEND_ARGS, START_TIMEOUT_S, backends, metric, router_process
from tests.server.serve_proc import serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # backends load the model: minutes on a shared machine

SYSTEMS = ["You are a pirate. Answer every question in the voice of a pirate captain who sails the seven "
           "seas and loves treasure, parrots and rum more than anything else in the world.",
           "You are a careful math tutor. Explain each step of your reasoning slowly and clearly, check the "
           "arithmetic twice, and end with the final answer on a line of its own."]


@pytest.fixture(scope="module")
def two():
    with backends(2, *BACKEND_ARGS) as bs:
        yield [u for _, u in bs], [p for p, _ in bs]


def chat(url: str, system: str, user: str, **kw) -> httpx.Response:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_prefix_keeps_a_system_prompt_on_one_backend(two):
    urls, _ = two
    with router_process(*sum((["--backend", u] for u in urls), []), "--policy", "prefix") as (_, r):
        seen: dict[int, list[str]] = {0: [], 1: []}
        for k in range(4):
            for s in range(2):
                resp = chat(r, SYSTEMS[s], f"question number {k}: what is {k} + {s}?")
                assert resp.status_code == 200, resp.text
                seen[s].append(resp.headers["x-tokenmill-backend"])
        assert len(set(seen[0])) == 1 and len(set(seen[1])) == 1, seen
        assert seen[0][0] != seen[1][0]  # two new prefixes on idle backends: one each
        assert metric(r, "tokenmill_router:prefix_matched_requests_total") == 6
        assert metric(r, "tokenmill_router:routing_hit_rate") >= 0.4  # the system prompt: about half of each prompt


def test_streaming_and_cancel_pass_through(two):
    urls, _ = two
    with router_process("--backend", urls[0], "--policy", "round-robin") as (_, r):
        body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
        direct = httpx.post(urls[0] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        events = []
        with httpx.stream("POST", r + "/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"


        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
        assert text == direct
        # cancel: read a few events, hang up; the backend aborts the request
        long = {"prompt": "Tell me a very long story.", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", r + "/v1/completions", json=long, timeout=60) as resp:
            n = 0
            for line in resp.iter_lines():
                n += line.startswith("data: ")
                if n == 3:
                    break
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if metric(urls[0], "tokenmill:num_requests_running") == 0 and \
                    metric(r, "tokenmill_router:backend_in_flight", 'backend="') == 0:
                break
            time.sleep(0.2)
        assert metric(urls[0], "tokenmill:num_requests_running") == 0
        assert metric(r, "tokenmill_router:backend_in_flight", 'backend="') == 0
        assert metric(urls[0], "tokenmill:generation_tokens_total") < 900


def test_data_parallel_serve_matches_one_engine(two):
    urls, _ = two
    prompts = [f"Write a list of {k} fruits:" for k in range(2, 8)]

    def complete(url: str, p: str) -> str:
        r = httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    want = [complete(urls[0], p) for p in prompts]
    dp = (*BACKEND_ARGS, "--data-parallel-size", "2", "--data-parallel-policy", "round-robin")
    with serve_process(*dp, start_timeout_s=START_TIMEOUT_S) as (_, u):
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            got = list(ex.map(lambda p: complete(u, p), prompts))
        assert got == want
        assert httpx.get(u + "/health").status_code == 200


def test_killed_backend_is_routed_around(two):
    urls, procs = two
    args = sum((["--backend", u] for u in urls), [])
    with router_process(*args, "--policy", "round-robin", "--health-interval-s", "30") as (_, r):
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            resps = list(ex.map(lambda k: chat(r, SYSTEMS[0], f"q{k}"), range(8)))
        assert [x.status_code for x in resps] == [200] * 8, [x.text for x in resps if x.status_code != 200]
        assert {x.headers["x-tokenmill-backend"] for x in resps} == {urls[0]}
        assert metric(r, "tokenmill_router:retries_total") >= 1
        assert metric(r, "tokenmill_router:backend_up", f'backend="{urls[1]}"') == 0
        h = httpx.get(r + "/health").json()
        assert h["backends_up"] == 1
