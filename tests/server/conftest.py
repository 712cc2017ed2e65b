"""Fixtures: live uvicorn servers over a fake engine (fast HTTP-layer tests)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeEngine  # noqa: E402
from live import LiveServers  # noqa: E402

from tokenmill.server.config import ServerConfig  # noqa: E402


@pytest.fixture(scope="module")
def fake() -> Iterator[LiveServers]:
    async def make() -> FakeEngine:
        return FakeEngine(max_model_len=512)

    servers = LiveServers(make)
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def fake_url(fake: LiveServers) -> str:
    return fake.add_app(ServerConfig(max_request_body_bytes=64 * 1024, request_timeout_s=1.0, watchdog_s=0.3))
