"""The router's backends: URL checks, a start-up probe, and the poll loop that keeps each backend's health
(GET /health) and load (GET /metrics: running, waiting, KV usage) current."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

import aiohttp

from tokenmill.errors import ConfigError
from tokenmill.router.policy import BackendLoad

logger = logging.getLogger("tokenmill.router")

_LOAD_METRICS = {"tokenmill:num_requests_running": "running", "tokenmill:num_requests_waiting": "waiting",
                 "tokenmill:kv_cache_usage_ratio": "kv_usage"}


# upstream answers that count as a failure before the first byte (the request goes to another backend)
RETRY_STATUS = (502, 503, 504)


def check_backend_url(url: str) -> str:
    """A backend URL without its trailing slash; ConfigError (one line) when it is not http(s)://host[:port]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad backend URL {url!r}: expected http://HOST:PORT (or https://...)")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"bad backend URL {url!r}: the port is not a number in [0, 65535]") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"bad backend URL {url!r}: no query or fragment allowed")
    return url.rstrip("/")


def parse_load(text: str) -> dict[str, float]:
    """running / waiting / kv_usage from a tokenmill server's Prometheus text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, value = line.partition(" ")
        key = _LOAD_METRICS.get(name)
        if key is not None:
            try:
                out[key] = float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return out


@dataclass
class Backend:
    index: int
    url: str
    healthy: bool = True
    load: BackendLoad = field(default_factory=BackendLoad)
    requests: int = 0  # responses started from this backend
    failures: int = 0  # requests that failed here before their first byte (then retried elsewhere)
    health_failures: int = 0  # consecutive failed health checks
    last_ok: float = 0.0
    why_down: str = ""


class BackendSet:
    def __init__(self, urls: list[str], health_interval_s: float, unhealthy_after: int, check_timeout_s: float,
                 on_down=None):
        if not urls:
            raise ConfigError("give at least one --backend URL")
        clean = [check_backend_url(u) for u in urls]
        dup = {u for u in clean if clean.count(u) > 1}
        if dup:
            raise ConfigError(f"backend {sorted(dup)[0]} is given more than once")
        self.backends = [Backend(i, u) for i, u in enumerate(clean)]
        self.health_interval_s, self.unhealthy_after, self.check_timeout_s = (health_interval_s, unhealthy_after,
                                                                              check_timeout_s)
        self._on_down = on_down
        self._task: Optional[asyncio.Task] = None
        self._session: Optional[aiohttp.ClientSession] = None

    @property
    def loads(self) -> list[BackendLoad]:
        return [b.load for b in self.backends]

    def healthy(self) -> list[int]:
        return [b.index for b in self.backends if b.healthy]

    def mark_down(self, b: Backend, why: str) -> None:
        if b.healthy:
            logger.warning("backend %s is down: %s", b.url, why)
            b.healthy, b.why_down = False, why
            if self._on_down is not None:
                self._on_down(b.index)

    def mark_up(self, b: Backend) -> None:
        if not b.healthy:
            logger.warning("backend %s is up again", b.url)
        b.healthy, b.why_down, b.health_failures = True, "", 0

    async def probe_all(self, timeout_s: float) -> list[str]:
        """At start: each backend answers /v1/models within timeout_s (retried), all with one model.
        Returns the model names; ConfigError (one line) naming the first backend that does not."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.check_timeout_s)) as s:
            names = await asyncio.gather(*(self._probe(s, b, timeout_s) for b in self.backends))
        if len(set(names)) > 1:
            raise ConfigError("the backends serve different models: " +
                              ", ".join(f"{b.url}: {n}" for b, n in zip(self.backends, names)))
        return names

    async def _probe(self, s: aiohttp.ClientSession, b: Backend, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        why = ""
        while True:
            try:
                async with s.get(b.url + "/v1/models") as r:
                    if r.status == 200:
                        data = await r.json(content_type=None)
                        return str(data["data"][0]["id"])
                    why = f"GET /v1/models answered HTTP {r.status}"
                    if r.status in (401, 403):
                        why += " (does it need --api-key?)"
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, TypeError, ValueError) as e:
                why = _why(e)
            if time.monotonic() >= deadline:
                raise ConfigError(f"backend {b.url} is not a reachable tokenmill server: {why}")
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.check_timeout_s))
        self._task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.poll(b) for b in self.backends))
            await asyncio.sleep(self.health_interval_s)

    async def poll(self, b: Backend) -> None:
        """One health + load check of a backend."""
        assert self._session is not None
        try:
            async with self._session.get(b.url + "/health") as r:
                ok, why = r.status == 200, f"/health answered HTTP {r.status}"
            if ok:
                async with self._session.get(b.url + "/metrics") as r:
                    if r.status == 200:
                        vals = parse_load(await r.text())
                        b.load.running = int(vals.get("running", 0))
                        b.load.waiting = int(vals.get("waiting", 0))
                        b.load.kv_usage = float(vals.get("kv_usage", 0.0))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            ok, why = False, _why(e)
        if ok:
            b.last_ok = time.monotonic()
            self.mark_up(b)
        else:
            b.health_failures += 1
            if b.health_failures >= self.unhealthy_after:
                self.mark_down(b, why)


def _why(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}".splitlines()[0]
