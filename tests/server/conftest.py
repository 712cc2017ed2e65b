"""Fixtures: live uvicorn servers over a fake engine (fast HTTP-layer tests)."""
from __future__ import annotations

import asyncio
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


def _real_config():
    from tokenmill.config import EngineConfig

    # a small context and queue so limits are reachable
    return EngineConfig.from_kwargs(max_model_len=512, max_num_seqs=16, max_waiting_requests=32)


def _live_engine(engine_cls) -> Iterator[LiveServers]:
    async def make():
        engine = await asyncio.to_thread(engine_cls.from_config, _real_config())
        engine.start()
        return engine

    servers = LiveServers(make)
    yield servers
    servers.close()


@pytest.fixture(scope="session")
def real() -> Iterator[LiveServers]:
    """The default model served as `tokenmill serve` does: the engine core in its own process (EngineProcClient)."""
    from tokenmill.engine.core_client import EngineProcClient

    yield from _live_engine(EngineProcClient)


@pytest.fixture(scope="session")
def real_url(real: LiveServers) -> str:
    return real.add_app(ServerConfig(request_timeout_s=120.0))


@pytest.fixture(scope="session")
def real_inproc() -> Iterator[LiveServers]:
    """The engine on a thread of this process (--no-engine-process): for tests that reach into the runner."""
    from tokenmill.engine.async_engine import AsyncEngine

    yield from _live_engine(AsyncEngine)


@pytest.fixture(scope="session")
def real_inproc_url(real_inproc: LiveServers) -> str:
    return real_inproc.add_app(ServerConfig(request_timeout_s=120.0))
