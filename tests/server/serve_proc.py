"""`tokenmill serve` in a subprocess, for tests that need the real CLI (signals, exit codes, start-up
lines): a free port, a start-up that waits for /health (failing with the server's stderr if it exits
first), and an SSE reader that records the events of one streamed completion."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(*args: str, start_timeout_s: float = 120.0,
                  env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `tokenmill serve --port P *args` (with `env` added to the environment); yield (process, base
    URL) once /health answers 200; kill it on exit if it is still running."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"server did not start within {start_timeout_s} s"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def stream_completion(url: str, body: dict, out: dict, started: threading.Event) -> None:
    """POST a streamed completion; record the status, the `data:` payloads (out["events"]) and a transport
    error's name (out["exc"]); set `started` at the first event and at the end."""
    events: list[str] = []
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
