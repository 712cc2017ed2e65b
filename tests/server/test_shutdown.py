"""`tokenmill serve` in a subprocess: it prints where it listens; SIGTERM lets in-flight requests finish
within the grace period, ends the rest with an error event (never a 200 with partial text), refuses new
connections, and exits 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, body: dict, out: dict, started: threading.Event) -> None:
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except httpx.HTTPError as e:
        out["exc"] = type(e).__name__
    out["events"] = events
    started.set()


@pytest.mark.slow
def test_sigterm_graceful_shutdown():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port),
                             "--max-model-len", "2048", "--shutdown-grace-s", "6"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.1)
        short, long_ = {}, {}
        ev_s, ev_l = threading.Event(), threading.Event()
        ts = threading.Thread(target=_stream, args=(url, {"prompt": "Once upon a time", "max_tokens": 4,
                                                          "stream": True, "ignore_eos": True}, short, ev_s))
        # 2000 tokens: well past the 4 s grace period at any CPU speed (480 finished inside it once decode passed
        # 120 tok/s)
        tl = threading.Thread(target=_stream, args=(url, {"prompt": "A long story:", "max_tokens": 2000,
                                                          "stream": True, "ignore_eos": True}, long_, ev_l))
        ts.start(), tl.start()
        assert ev_s.wait(60) and ev_l.wait(60)
        proc.send_signal(signal.SIGTERM)
        ts.join(60), tl.join(60)
        # the short request finished normally inside the grace period
        assert short["events"][-1] == "[DONE]", short
        assert json.loads(short["events"][-2])["choices"][0]["finish_reason"] == "length"
        # the long one was aborted when the grace period ended: an error event, then the stream closed cleanly
        assert long_["events"][-1] == "[DONE]", long_
        assert json.loads(long_["events"][-2])["error"]["code"] == "aborted", long_["events"][-3:]
        finishes = [json.loads(e)["choices"][0].get("finish_reason") for e in long_["events"][:-2]
                    if json.loads(e).get("choices")]
        assert not any(finishes), long_["events"][-3:]
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read().decode()
        assert f"tokenmill serving SmolLM2-135M-Instruct on http://127.0.0.1:{port}" in proc.stdout.read().decode()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
