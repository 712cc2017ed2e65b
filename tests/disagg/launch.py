"""A prefill instance, a decode instance and `tokenmill disagg-proxy` as subprocesses on 127.0.0.1, for the
disaggregation tests (and the /metrics figures they check)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import httpx

from tests.server.serve_proc import ROOT, free_port


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a session of its own: stop() kills the engine process with the server
    return subprocess.Popen([sys.executable, "-m", "tokenmill.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"{url} did not start within {timeout_s} s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the server and its engine process (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^tokenmill:{name}(?:_total)? ([0-9.e+-]+)$", text, re.M)
    assert m, f"no metric {name} at {url}"
    return float(m.group(1))


@dataclass
class Pair:
    prefill: str
    decode: str
    proxy: str
    kv_port: int
    procs: dict


def serve_args(model_args: list[str], port: int, *extra: str) -> list[str]:
    return ["serve", "--port", str(port), *model_args, *extra]


@contextlib.contextmanager
def disagg_pair(model_args: list[str], *engine_args: str, timeout_s: float = 3.0) -> Iterator[Pair]:
    """Producer + consumer (same model and engine args) + proxy; kv_transfer_timeout timeout_s."""
    pp, dp, xp, kp = free_port(), free_port(), free_port(), free_port()
    t = ["--kv-transfer-timeout", str(timeout_s)]
    procs = {"prefill": start(serve_args(model_args, pp, *engine_args, "--kv-role", "producer",
                                         "--kv-transfer-port", str(kp), *t)),
             "decode": start(serve_args(model_args, dp, *engine_args, "--kv-role", "consumer", *t)),
             "proxy": start(["disagg-proxy", "--prefill", f"http://127.0.0.1:{pp}",
                             "--decode", f"http://127.0.0.1:{dp}", "--port", str(xp)])}
    try:
        for name, port in (("prefill", pp), ("decode", dp), ("proxy", xp)):
            wait_healthy(procs[name], f"http://127.0.0.1:{port}")
        yield Pair(f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{dp}", f"http://127.0.0.1:{xp}", kp, procs)
    finally:
        for p in procs.values():
            stop(p)
