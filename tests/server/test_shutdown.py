"""`tokenmill serve` in a subprocess: it prints where it listens; SIGTERM lets in-flight requests finish
within the grace period, ends the rest with an error event (never a 200 with partial text), refuses new
connections, and exits 0."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from serve_proc import serve_process, stream_completion

@pytest.mark.slow
def test_sigterm_graceful_shutdown():
    with serve_process("--max-model-len", "2048", "--shutdown-grace-s", "6") as (proc, url):
        port = url.rsplit(":", 1)[1]
        short, long_ = {}, {}
        ev_s, ev_l = threading.Event(), threading.Event()
        ts = threading.Thread(target=stream_completion, args=(url, {"prompt": "Once upon a time", "max_tokens": 4,
                                                          "stream": True, "ignore_eos": True}, short, ev_s))
        # 2000 tokens: well past the 4 s grace period at any CPU speed (480 finished inside it once decode passed
        # 120 tok/s)
        tl = threading.Thread(target=stream_completion, args=(url, {"prompt": "A long story:", "max_tokens": 2000,
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


@pytest.mark.slow
def test_killed_server_leaves_no_socket_dir(tmp_path):
    """SIGKILL gives the server no chance to clean up: the engine process, which exits when the server's
    end of its pipe closes, removes the ZeroMQ socket directory itself (a supervisor or a test harness that
    kills servers used to leave one /tmp/tokenmill-* directory per server)."""
    with serve_process("--max-model-len", "512", env={"TMPDIR": str(tmp_path)}) as (proc, url):
        assert [p.name for p in tmp_path.glob("tokenmill-*")], "the engine process's socket dir is missing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 20
    while list(tmp_path.glob("tokenmill-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(tmp_path.glob("tokenmill-*"))
