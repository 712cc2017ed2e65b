"""Disaggregated prefill / decode as a user runs it: `tokenmill serve --kv-role producer`, `tokenmill serve
--kv-role consumer` and `tokenmill disagg-proxy` on 127.0.0.1. Greedy answers through the proxy equal a
colocated instance's (chunked prefill, prefix caching, int8 KV), with the KV really moved (the decode side
computes no prompt token); a producer killed before the pull still ends in a full answer (recompute); no
block is left held on either side after many requests with client disconnects."""
from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest

from tests.disagg.launch import disagg_pair, metric, serve_args, start, stop, wait_healthy
from tests.model.tiny_models import tiny_config
from tests.server.serve_proc import free_port

pytestmark = pytest.mark.slow  # three servers start per pair (about a minute on the shared 2-core machine)

SYSTEM = "You are a careful assistant. Answer briefly and do not repeat the question back. " * 3
PROMPTS = [
    "The capital of France is",
    SYSTEM + "Question: what is two plus two?",
    SYSTEM + "Question: name a colour of the sky.",
    " ".join(f"word{i}" for i in range(90)),  # longer than a step's token budget: chunked prefill
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, gguf_tokenizer_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size = 49152
    cfg.max_position_embeddings = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("disagg-llama"))
    model.save_pretrained(path)
    return ["--model", path, "--tokenizer", gguf_tokenizer_path, "--max-model-len", "1024"]


ENGINE = ("--max-num-batched-tokens", "32", "--block-size", "16")  # chunked prefill; prefix caching is on


def complete(url: str, prompt: str, max_tokens: int = 12, **extra) -> dict:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                  **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(url: str, path: str, body: dict) -> str:
    text = ""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])["choices"]
                if ch:
                    text += ch[0].get("text") or ch[0].get("delta", {}).get("content") or ""
    return text


def check_identical(pair, n_rounds: int = 2) -> None:
    ref = [complete(pair.prefill, p, cache_salt="colocated")["choices"][0]["text"] for p in PROMPTS]
    computed0, pulled_before = metric(pair.decode, "prompt_tokens"), metric(pair.decode, "kv_transfer_recv_ok")
    for _ in range(n_rounds):  # the second round hits both prefix caches (the decode side pulls fewer blocks)
        got = [complete(pair.proxy, p)["choices"][0]["text"] for p in PROMPTS]
        assert got == ref
    assert stream_text(pair.proxy, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 12,
                                                        "temperature": 0}) == ref[1]
    chat = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8, "temperature": 0}
    want = httpx.post(pair.prefill + "/v1/chat/completions", json={**chat, "cache_salt": "colocated"},
                      timeout=120).json()["choices"][0]["message"]["content"]
    assert stream_text(pair.proxy, "/v1/chat/completions", chat) == want
    got = httpx.post(pair.proxy + "/v1/chat/completions", json=chat, timeout=120).json()
    assert got["choices"][0]["message"]["content"] == want and got["usage"]["completion_tokens"] == 8
    # the KV really moved: every request pulled, no prompt token computed on the decode side
    # (a prompt wholly in the decode side's own prefix cache on the second round has nothing to pull)
    assert metric(pair.decode, "kv_transfer_recv_ok") - pulled_before >= len(PROMPTS)
    assert metric(pair.decode, "kv_transfer_recv_failed") == 0
    assert metric(pair.decode, "prompt_tokens") == computed0
    assert metric(pair.prefill, "prefix_cache_hits") > 0 and metric(pair.decode, "prefix_cache_hits") > 0


def wait_no_blocks(*urls: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        used = [metric(u, "kv_cache_blocks_used") for u in urls]
        if not any(used):
            return
        assert time.monotonic() < deadline, f"blocks still held: {dict(zip(urls, used))}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pair(tiny_model):
    with disagg_pair(tiny_model, *ENGINE) as p:
        yield p


def test_greedy_identical_to_colocated(pair):
    check_identical(pair)


def test_router_pairs_prefill_and_decode(pair):
    """`tokenmill router --prefill URL --decode URL`: the same answers as colocated, and its own errors."""
    import dataclasses

    from tests.router.procs import metric as router_metric
    from tests.router.procs import router_process

    with router_process("--prefill", pair.prefill, "--decode", pair.decode, "--policy", "prefix") as (_, url):
        check_identical(dataclasses.replace(pair, proxy=url), n_rounds=1)
        assert router_metric(url, "tokenmill_router:routed_requests_total") >= len(PROMPTS) + 3
        assert router_metric(url, "tokenmill_router:prefix_matched_requests_total") >= 1  # the shared SYSTEM
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": -1}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"  # the prefill side's answer
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"]  # other routes: a decode instance
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["backends_up"] == health["backends"] == 2


def test_proxy_and_server_errors(pair):
    r = httpx.post(pair.proxy + "/v1/completions", json={"prompt": "x", "n": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(pair.proxy + "/v1/completions", json={"prompt": "x", "temperature": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"  # the prefill side's own answer
    r = httpx.post(pair.decode + "/v1/completions", json={"prompt": "x", "kv_transfer_params": {
        "do_remote_decode": True, "transfer_id": "t"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"  # not a producer
    r = httpx.post(pair.prefill + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "stream": True,
                                                          "kv_transfer_params": {"do_remote_decode": True,
                                                                                 "transfer_id": "t"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = httpx.post(pair.decode + "/v1/completions", json={"prompt": "x", "kv_transfer_params": {
        "do_remote_prefill": True, "transfer_id": "t", "remote_host": "127.0.0.1", "remote_port": 70000,
        "first_token_id": 1}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"


def test_killed_producer_still_answers_by_recompute(pair, tiny_model):
    """A second producer dies after the prefill, before the decode side pulls: the decode side recomputes."""
    port, kv_port = free_port(), free_port()
    proc = start(serve_args(tiny_model, port, *ENGINE, "--kv-role", "producer", "--kv-transfer-port", str(kv_port)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        prompt = "A prompt no instance has seen: " + " ".join(f"item{i}" for i in range(60))
        ref = complete(url, prompt, cache_salt="colocated")["choices"][0]["text"]
        pre = complete(url, prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True,
                                                                     "transfer_id": "killed-1"})
        kv = pre["kv_transfer_params"]
        assert kv["remote_port"] == kv_port and kv["do_remote_prefill"]
    finally:
        stop(proc)
    failed0 = metric(pair.decode, "kv_transfer_recv_failed")
    got = complete(pair.decode, prompt, kv_transfer_params=kv)["choices"][0]["text"]
    assert got == ref
    deadline = time.monotonic() + 5  # /metrics reads the engine's last step's figures
    while metric(pair.decode, "kv_transfer_recv_failed") != failed0 + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(pair.decode, "kv_transfer_recv_failed") == failed0 + 1
    wait_no_blocks(pair.decode, timeout_s=10)


def _client(url: str, prompt: str, mode: str) -> None:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
    try:
        if mode == "stream-cut":  # disconnect after the first event
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
        elif mode == "impatient":  # disconnect during the prefill or the transfer
            httpx.post(url + "/v1/completions", json=body, timeout=random.uniform(0.01, 0.3))
        else:
            assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
    except httpx.TimeoutException:
        pass


def run_with_disconnects(pair, n: int, concurrency: int = 8, timeout_s: float = 3.0) -> None:
    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS) + f" #{i % 7}", rng.choice(["stream-cut", "impatient", "full"])) for i in range(n)]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                prompt, mode = jobs.pop()
            _client(pair.proxy, prompt, mode)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    # held producer blocks of requests whose decode side never came expire after kv_transfer_timeout
    wait_no_blocks(pair.prefill, pair.decode, timeout_s=timeout_s + 30)
    assert metric(pair.prefill, "num_requests_running") == 0 and metric(pair.decode, "num_requests_running") == 0
    assert complete(pair.proxy, PROMPTS[0])["choices"][0]["text"]  # still serving


def test_no_leaked_blocks_after_200_requests_with_disconnects(pair):
    run_with_disconnects(pair, 200)


def test_int8_kv_greedy_identical(tiny_model):
    with disagg_pair(tiny_model, *ENGINE, "--kv-cache-dtype", "int8") as p:
        check_identical(p)


def test_default_model_greedy_identical():
    with disagg_pair(["--max-model-len", "1024"], *ENGINE) as p:
        check_identical(p, n_rounds=1)
