"""The engine core in its own process: killed during a stream, the client gets an error event, /health
fails, new requests are refused, and `tokenmill serve` exits non-zero; nothing hangs."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import httpx
import pytest

from live import LiveServers
from serve_proc import stream_completion, serve_process
from tokenmill.config import EngineConfig
from tokenmill.server.config import ServerConfig

LONG = {"prompt": "A long story:", "max_tokens": 400, "stream": True, "ignore_eos": True}


def _assert_error_event(out: dict) -> None:
    assert out.get("status") == 200 and out["events"][-1] == "[DONE]", out
    err = json.loads(out["events"][-2])
    assert "error" in err and "engine has stopped" in err["error"]["message"], out["events"][-3:]


def test_killed_engine_process_ends_streams_and_fails_health():
    from tokenmill.engine.core_client import EngineProcClient

    async def make() -> EngineProcClient:
        cfg = EngineConfig.from_kwargs(max_model_len=512, max_num_seqs=4)
        return (await asyncio.to_thread(EngineProcClient.from_config, cfg)).start()

    servers = LiveServers(make)
    try:
        url = servers.add_app(ServerConfig(request_timeout_s=120.0))
        assert httpx.get(url + "/health").status_code == 200
        out, started = {}, threading.Event()
        t = threading.Thread(target=stream_completion, args=(url, LONG, out, started))
        t.start()
        assert started.wait(60)
        os.kill(servers.engine._proc.pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive(), "the stream hung after the engine died"
        _assert_error_event(out)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "dead" in health.text
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code >= 500 and "engine has stopped" in r.json()["error"]["message"]
    finally:
        servers.close()


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


@pytest.mark.slow
def test_serve_exits_nonzero_when_the_engine_process_dies():
    with serve_process("--max-model-len", "512", "--max-num-seqs", "4") as (proc, url):
        # the engine process is the multiprocessing spawn child (the other child is its resource tracker)
        (engine_pid,) = [c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        out, started = {}, threading.Event()
        t = threading.Thread(target=stream_completion, args=(url, LONG, out, started))
        t.start()
        assert started.wait(60)
        os.kill(engine_pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive(), "the stream hung after the engine died"
        _assert_error_event(out)
        assert proc.wait(60) == 1
