"""The router's proxy against in-process fake backends (fast): streams relayed byte for byte, keep-alive
upstream connections, cancel on client disconnect, retries before the first byte, health checks, its own
errors, prefix routing and the disaggregated prefill -> decode pairing."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import uvloop

from tests.router.fake_upstream import SSE_EVENTS, FakeBackend, ScriptedBackend, raw_exchange, running_router
from tests.server.fake_engine import ByteTokenizer, FakeProcessor
from tokenmill.router.prompt import PromptHasher

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def run(coro, loop: str = "asyncio"):
    async def bounded():
        return await asyncio.wait_for(coro, 60)

    return LOOPS[loop](bounded())


async def until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


def post_bytes(path: bytes, body: dict, extra: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s"
            b"connection: close\r\n\r\n%s" % (path, len(data), extra, data))


async def backends(n: int) -> list[FakeBackend]:
    return [await FakeBackend().start() for _ in range(n)]


async def stop(bes: list[FakeBackend]) -> None:
    for b in bes:
        await b.stop()


@pytest.mark.parametrize("loop", list(LOOPS))
def test_stream_is_relayed_byte_for_byte(loop):
    async def main():
        bes = await backends(1)
        try:
            async with running_router(bes[0].url) as (router, url):
                req = post_bytes(b"/v1/completions?x=1", {"prompt": "hi", "stream": True})
                direct = await raw_exchange(bes[0].url, req)
                routed = await raw_exchange(url, req)
                dhead, _, dbody = direct.partition(b"\r\n\r\n")
                rhead, _, rbody = routed.partition(b"\r\n\r\n")
                assert rbody == dbody  # chunk framing included
                assert rbody.count(b"data: ") == SSE_EVENTS + 1 and rbody.endswith(b"0\r\n\r\n")
                assert routed.startswith(b"HTTP/1.1 200 OK\r\n")
                lower = rhead.lower()
                assert b"transfer-encoding: chunked" in lower and b"content-type: text/event-stream" in lower
                assert b"x-tokenmill-backend: " + bes[0].url.encode() in rhead
                assert bes[0].requests[-1]["path"] == "/v1/completions?x=1"
                assert router.set.backends[0].load.in_flight == 0
        finally:
            await stop(bes)

    run(main(), loop)


def test_keep_alive_upstream_connections_are_reused():
    async def main():
        bes = await backends(1)
        try:
            async with running_router(bes[0].url) as (router, url), aiohttp.ClientSession() as s:
                for k in range(6):
                    async with s.post(url + "/v1/completions", json={"prompt": "a", "stream": k % 2 == 1}) as r:
                        assert r.status == 200
                        body = await r.read()
                        assert (b"[DONE]" in body) == (k % 2 == 1)
                assert len(bes[0].peers) == 1  # one upstream connection for all six
                assert len(router.pools[bes[0].url].idle) == 1
                assert router.set.backends[0].requests == 6 and router.routed_requests == 6
                await bes[0].stop()  # closes its idle connections: the pool lets them go
                assert await until(lambda: not router.pools[bes[0].url].idle and not router.pools[bes[0].url].open)
        finally:
            await stop(bes)

    run(main())


def test_concurrent_streams():
    async def main():
        bes = await backends(2)
        try:
            async with running_router(*(b.url for b in bes)) as (router, url), aiohttp.ClientSession() as s:
                async def one(k: int) -> bytes:
                    async with s.post(url + "/v1/completions", json={"prompt": str(k), "stream": True}) as r:
                        assert r.status == 200
                        return await r.read()

                outs = await asyncio.gather(*(one(k) for k in range(32)))
                assert all(o.count(b"data: ") == SSE_EVENTS + 1 for o in outs)
                assert [b.requests for b in router.set.backends] == [16, 16]
                assert all(b.load.in_flight == 0 for b in router.set.backends)
        finally:
            await stop(bes)

    run(main())


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("when", ["streaming", "before the head"])
def test_client_disconnect_aborts_the_upstream_request(loop, when):
    async def main():
        bes = await backends(1)
        be = bes[0]
        be.events, be.step_s = 100_000, 0.005
        if when == "before the head":
            be.delay_s = 0.5
        try:
            async with running_router(be.url) as (router, url):
                host, port = url.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(post_bytes(b"/v1/completions", {"prompt": "long", "stream": True}))
                if when == "streaming":
                    got = b""
                    while got.count(b"data: ") < 3:
                        got += await reader.read(65536)
                else:
                    assert await until(lambda: router.set.backends[0].load.in_flight == 1)
                writer.close()
                assert await until(lambda: be.cancelled == 1 and be.in_stream == 0)
                assert router.set.backends[0].load.in_flight == 0
                assert router.set.backends[0].healthy
        finally:
            await stop(bes)

    run(main(), loop)


@pytest.mark.parametrize("mode", ["close", "503"])
def test_failure_before_the_first_byte_goes_to_another_backend(mode):
    async def main():
        bad, good = await backends(2)
        bad.mode = mode
        try:
            async with running_router(bad.url, good.url) as (router, url), aiohttp.ClientSession() as s:
                for k in range(4):
                    async with s.post(url + "/v1/completions", json={"prompt": "a", "stream": k % 2 == 0}) as r:
                        assert r.status == 200, await r.text()
                        assert r.headers["x-tokenmill-backend"] == good.url
                        await r.read()
                b0 = router.set.backends[0]
                assert not b0.healthy and b0.failures == 1 and router.retries == 1
                assert (mode == "503") == (b0.why_down == "HTTP 503")
                assert all(b.load.in_flight == 0 for b in router.set.backends)
        finally:
            await stop([bad, good])

    run(main())


def test_refused_connection_goes_to_another_backend_then_503():
    async def main():
        gone, good = await backends(2)
        try:
            async with running_router(gone.url, good.url) as (router, url), aiohttp.ClientSession() as s:
                await gone.stop()
                async with s.post(url + "/v1/completions", json={"prompt": "a"}) as r:
                    assert r.status == 200 and r.headers["x-tokenmill-backend"] == good.url
                assert "cannot connect" in router.set.backends[0].why_down
                await good.stop()
                async with s.post(url + "/v1/completions", json={"prompt": "a"}) as r:
                    assert r.status == 503
                    err = (await r.json())["error"]
                    assert err["code"] == "no_backend" and gone.url in err["message"]
                assert router.unroutable == 1
        finally:
            await stop([gone, good])

    run(main())


def test_one_backend_answering_503_is_relayed_as_is():
    async def main():
        bes = await backends(1)
        bes[0].mode = "503"
        try:
            async with running_router(bes[0].url) as (router, url), aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/completions", json={"prompt": "a"}) as r:
                    assert r.status == 503 and (await r.json()) == {"error": "overloaded"}
                assert router.set.backends[0].healthy and router.retries == 0
        finally:
            await stop(bes)

    run(main())


def test_a_closed_keep_alive_connection_is_replaced_on_the_same_backend():
    async def main():
        bes = await backends(1)
        bes[0].mode = "close-reused"  # a reused connection is dropped before answering, as an idle-closed one
        try:
            async with running_router(bes[0].url) as (router, url), aiohttp.ClientSession() as s:
                for _ in range(3):
                    async with s.post(url + "/v1/completions", json={"prompt": "a"}) as r:
                        assert r.status == 200, await r.text()
                b = router.set.backends[0]
                assert b.healthy and b.failures == 0 and router.retries == 0 and b.load.in_flight == 0
                assert len(bes[0].peers) == 3
        finally:
            await stop(bes)

    run(main())


def test_health_checks_mark_a_backend_down_and_up():
    async def main():
        bes = await backends(1)
        try:
            async with running_router(bes[0].url, health_interval_s=0.05, unhealthy_after=2) as (router, url), \
                    aiohttp.ClientSession() as s:
                async def health() -> int:
                    async with s.get(url + "/health") as r:
                        return r.status

                assert await health() == 200
                bes[0].healthy = False
                assert await until(lambda: not router.set.backends[0].healthy)
                assert await health() == 503
                async with s.post(url + "/v1/completions", json={"prompt": "a"}) as r:
                    assert r.status == 503 and (await r.json())["error"]["code"] == "no_backend"
                bes[0].healthy = True
                assert await until(lambda: router.set.backends[0].healthy)
                assert await health() == 200
        finally:
            await stop(bes)

    run(main())


def test_request_headers_and_bodies_forwarded():
    async def main():
        bes = await backends(1)
        try:
            async with running_router(bes[0].url) as (router, url):
                # a chunked request body, an API key, two pipelined requests on one connection
                one = (b"POST /v1/completions HTTP/1.1\r\nhost: router\r\nauthorization: Bearer sk-test\r\n"
                       b"transfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n"
                       b"5\r\n{\"pro\r\nb\r\nmpt\": \"hi\"}\r\n0\r\n\r\n")
                two = b"GET /v1/models HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n"
                out = await raw_exchange(url, one + two)
                assert out.count(b"HTTP/1.1 200 OK\r\n") == 2
                assert out.index(b'"hello"') < out.index(b'"fake-model"')  # answered in order
                seen = bes[0].requests[-1]
                assert seen["body"] == b'{"prompt": "hi"}'
                assert seen["headers"]["Authorization"] == "Bearer sk-test"
                assert seen["headers"]["Host"] == bes[0].url.removeprefix("http://")
                assert seen["headers"]["Content-Length"] == "16" and "Transfer-Encoding" not in seen["headers"]
        finally:
            await stop(bes)

    run(main())


def test_the_routers_own_answers_and_errors():
    async def main():
        bes = await backends(1)
        try:
            async with running_router(bes[0].url, max_request_bytes=1000) as (router, url), \
                    aiohttp.ClientSession() as s:
                async with s.get(url + "/health") as r:
                    assert r.status == 200 and (await r.json()) == {"status": "ok", "backends_up": 1, "backends": 1}
                async with s.post(url + "/v1/completions", json={"prompt": "a"}) as r:
                    assert r.status == 200
                async with s.get(url + "/v1/models") as r:
                    assert r.status == 200
                async with s.get(url + "/metrics") as r:
                    text = await r.text()
                    assert f'tokenmill_router:backend_requests_total{{backend="{bes[0].url}"}} 2.0' in text
                    assert "tokenmill_router:routed_requests_total 1.0" in text
                for method, path, status, code in [("GET", "/nope", 404, "not_found"),
                                                   ("POST", "/health", 405, "method_not_allowed"),
                                                   ("OPTIONS", "/v1/models", 405, "method_not_allowed")]:
                    async with s.request(method, url + path) as r:
                        assert r.status == status and (await r.json())["error"]["code"] == code
                async with s.post(url + "/v1/completions", data=b"x" * 1001) as r:
                    assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
            async with running_router(bes[0].url) as (router, url):
                out = await raw_exchange(url, b"NOT HTTP AT ALL\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 400 ") and b"bad_request" in out
                out = await raw_exchange(url, b"GET /v1/models HTTP/1.1\r\n" + b"x-big: " + b"a" * 70000 + b"\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 431 ")
        finally:
            await stop(bes)

    run(main())


def test_prefix_policy_keeps_a_prompt_prefix_on_one_backend():
    async def main():
        bes = await backends(2)
        hasher = PromptHasher(FakeProcessor(ByteTokenizer(), 1 << 20), block_size=4, max_blocks=64)
        try:
            async with running_router(*(b.url for b in bes), policy="prefix", hasher=hasher) as (router, url), \
                    aiohttp.ClientSession() as s:
                seen: dict[str, set] = {"a": set(), "b": set()}
                for k in range(3):
                    for sys_ in ("a", "b"):
                        prompt = f"{sys_ * 40} system prompt: question {k}"
                        async with s.post(url + "/v1/completions", json={"prompt": prompt}) as r:
                            assert r.status == 200
                            seen[sys_].add(r.headers["x-tokenmill-backend"])
                assert len(seen["a"]) == 1 and len(seen["b"]) == 1 and seen["a"] != seen["b"]
                assert router.matched_requests == 4 and router.routed_requests == 6
        finally:
            await stop(bes)

    run(main())


def test_disaggregated_prefill_then_decode():
    async def main():
        pre, dec = await backends(2)
        try:
            async with running_router(prefill=[pre.url], decode=[dec.url]) as (router, url), \
                    aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True}) as r:
                    assert r.status == 200 and r.headers["x-tokenmill-backend"] == dec.url
                    assert (await r.read()).count(b"data: ") == SSE_EVENTS + 1
                p = json.loads(pre.requests[-1]["body"])
                assert p["max_tokens"] == 1 and p["stream"] is False and p["kv_transfer_params"]["do_remote_decode"]
                d = json.loads(dec.requests[-1]["body"])
                assert d["kv_transfer_params"] == {"first_token_id": 7} and d["stream"] is True
                assert router.pd.transfers == 1 and router.routed_requests == 1
                async with s.post(url + "/v1/completions", data=b"{not json") as r:
                    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
                async with s.get(url + "/v1/models") as r:  # every other route: a decode instance
                    assert r.status == 200 and r.headers["x-tokenmill-backend"] == dec.url
                pre.mode = "close"
                async with s.post(url + "/v1/completions", json={"prompt": "hi"}) as r:
                    assert r.status == 503 and (await r.json())["error"]["code"] == "no_backend"
                assert router.retries == 1 and router.pd.prefill.backends[0].load.in_flight == 0
        finally:
            await stop([pre, dec])

    run(main())


def test_a_head_alone_is_relayed_at_once_and_an_unframed_body_ends_with_the_connection():
    async def main():
        be = await ScriptedBackend([b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n", 0.3, b"first ", 0.05,
                                    b"second"]).start()
        try:
            async with running_router(be.url) as (router, url):
                host, port = url.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET /v1/stuff HTTP/1.1\r\nhost: x\r\n\r\n")
                t0 = time.monotonic()
                head = await reader.readuntil(b"\r\n\r\n")
                assert time.monotonic() - t0 < 0.25  # before the body's first bytes (0.3 s later)
                assert b"connection: close" in head.lower() and b"x-tokenmill-backend" in head
                assert await asyncio.wait_for(reader.read(-1), 5) == b"first second"  # then the router closes
                writer.close()
                assert await until(lambda: router.set.backends[0].load.in_flight == 0)
                assert router.set.backends[0].healthy
        finally:
            await be.stop()

    run(main())


def test_a_backend_failing_mid_response_truncates_the_clients_response():
    async def main():
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        be = await ScriptedBackend([head + b"6\r\nfirst \r\n", 0.05]).start()
        try:
            async with running_router(be.url) as (router, url):
                out = await raw_exchange(url, b"GET /v1/stuff HTTP/1.1\r\nhost: x\r\n\r\n")
                assert out.endswith(b"\r\n\r\n6\r\nfirst \r\n")  # no final chunk: the client sees the cut
                assert router.set.backends[0].load.in_flight == 0 and router.retries == 0
        finally:
            await be.stop()

    run(main())


def test_a_client_that_stops_reading_pauses_the_upstream_connection():
    async def main():
        chunk = b"x" * (1 << 20)
        framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        be = await ScriptedBackend([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"] + [framed] * 40 +
                                   [b"0\r\n\r\n"]).start()
        try:
            async with running_router(be.url) as (router, url):
                host, port = url.removeprefix("http://").split(":")
                reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 16)
                writer.write(b"GET /v1/big HTTP/1.1\r\nhost: x\r\n\r\n")
                ups = router.pools[be.url].open
                assert await until(lambda: any(not u.transport.is_reading() for u in ups))
                got = 0
                while chunk_ := await reader.read(1 << 20):
                    got += len(chunk_)
                    if got >= 40 * len(framed):
                        break
                assert got >= 40 * len(framed)
                writer.close()
        finally:
            await be.stop()

    run(main())


def test_an_upgrade_request_is_answered_as_plain_http():
    async def main():
        bes = await backends(1)
        try:
            async with running_router(bes[0].url) as (router, url):
                out = await raw_exchange(url, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, "
                                              b"HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAA\r\n\r\n"
                                              b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                assert out.count(b"HTTP/1.1 200 OK\r\n") == 2 and b"upgrade" not in out.lower()
                out = await raw_exchange(url, b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 400 ")
        finally:
            await stop(bes)

    run(main())
