"""Subprocesses for the router tests: `tokenmill serve` backends started in parallel, and `tokenmill router`."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx

from tests.server.serve_proc import ROOT, free_port, serve_process

BACKEND_ARGS = ("--max-model-len", "1024", "--max-num-seqs", "16")
START_TIMEOUT_S = 400.0  # the test machine is shared: loading can take minutes


@contextlib.contextmanager
def backends(n: int, *args: str) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    cms = [serve_process(*args, start_timeout_s=START_TIMEOUT_S) for _ in range(n)]
    with ThreadPoolExecutor(n) as ex:
        futs = [ex.submit(cm.__enter__) for cm in cms]
    entered, error = [], None
    for cm, f in zip(cms, futs):
        try:
            entered.append((cm, f.result()))
        except BaseException as exc:  # noqa: BLE001
            error = error or exc
    try:
        if error is not None:
            raise error
        yield [r for _, r in entered]
    finally:
        for cm, _ in entered:
            cm.__exit__(None, None, None)


def run_router(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", "router", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def router_process(*args: str, start_timeout_s: float = 60.0) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "router", "--port", str(port), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"router did not start within {start_timeout_s} s"
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def metric(url: str, name: str, label: str = "") -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + (("{" + label) if label else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
