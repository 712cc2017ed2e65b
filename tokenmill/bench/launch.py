"""Start a server process for a benchmark and wait until it answers /health (tokenmill or a peer)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Iterator, Optional

import httpx

from tokenmill.bench.types import BenchError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, proc: Optional[subprocess.Popen] = None, timeout_s: float = 300.0) -> None:
    """Poll GET /health until 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise BenchError(f"the server at {base_url} was not healthy after {timeout_s:.0f} s")


@contextlib.contextmanager
def server_process(cmd: list[str], log_path: Optional[str] = None, env: Optional[dict] = None,
                   timeout_s: float = 300.0) -> Iterator[str]:
    """Run `cmd` ("{port}" in it is replaced by a free port); yield its base URL once healthy; stop it
    with SIGTERM (then SIGKILL) on exit."""
    port = free_port()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], stdout=log, stderr=log,
                            env=dict(os.environ, **(env or {})))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout_s)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()
