"""--policy slo --slo-reject over the real engine: hopeless requests get HTTP 429, none hangs or leaks."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from live import LiveServers  # noqa: E402

from tokenmill.server.config import ServerConfig  # noqa: E402


@pytest.fixture(scope="module")
def slo_url():
    from tokenmill.config import EngineConfig
    from tokenmill.engine.async_engine import AsyncEngine

    async def make() -> AsyncEngine:
        # one request at a time and a 20 ms first-token target: whoever queues behind a 48-token answer
        # has waited far past twice its target and is rejected
        cfg = EngineConfig.from_kwargs(max_model_len=256, max_num_seqs=1, policy="slo", slo_reject=True,
                                       slo_ttft_ms=20.0, slo_tpot_ms=10_000.0)
        engine = await asyncio.to_thread(AsyncEngine.from_config, cfg)
        engine.start()
        return engine

    servers = LiveServers(make)
    yield servers.add_app(ServerConfig(request_timeout_s=120.0))
    servers.close()


def test_hopeless_requests_get_429_and_nothing_leaks(slo_url):
    async def run() -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int, stream: bool) -> tuple[int, dict]:
                body = {"prompt": f"Story {i}:", "max_tokens": 48, "ignore_eos": True, "stream": stream}
                r = await client.post(slo_url + "/v1/completions", json=body)
                return r.status_code, (r.json() if r.status_code != 200 or not stream else {})

            return await asyncio.gather(*[one(i, i % 2 == 1) for i in range(6)])

    results = asyncio.run(run())
    codes = [c for c, _ in results]
    assert 200 in codes and 429 in codes, codes
    for code, body in results:
        if code == 429:
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "slo_rejected", body
    text = httpx.get(slo_url + "/metrics").text
    assert "tokenmill:kv_cache_blocks_used 0.0" in text
    assert 'tokenmill:request_success_total{finish_reason="rejected"}' in text
