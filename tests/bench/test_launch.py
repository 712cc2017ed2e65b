"""The benchmark's server launcher: fails fast on a dead process, yields a URL for a healthy one."""
from __future__ import annotations

import sys

import httpx
import pytest

from tokenmill.bench.launch import server_process
from tokenmill.bench.types import BenchError

HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_dead_server_is_a_clear_error():
    with pytest.raises(BenchError, match="exited with code 3"):
        with server_process([sys.executable, "-c", "import sys; sys.exit(3)"], timeout_s=20):
            pass


def test_healthy_server_yields_its_url_and_is_stopped():
    with server_process([sys.executable, "-c", HEALTH_SERVER, "{port}"], timeout_s=20) as base:
        assert httpx.get(base + "/health").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=2)
