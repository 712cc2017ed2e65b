"""Run tokenmill apps under uvicorn on 127.0.0.1 (free ports) in a background thread's event loop.

The engine is created inside that loop, so several apps (different ServerConfigs) can share one engine.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import Future
from typing import Any, Awaitable, Callable, Optional

import uvicorn

from tokenmill.server.app import build_app
from tokenmill.server.guards import header_timeout_protocol
from tokenmill.server.config import ServerConfig


class LiveServers:
    def __init__(self, make_engine: Callable[[], Awaitable[Any]]):
        self._make_engine = make_engine
        self.loop = asyncio.new_event_loop()
        self.engine: Any = None
        self._servers: list[uvicorn.Server] = []
        self._tasks: list[asyncio.Task] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="tokenmill-live", daemon=True)
        self._thread.start()
        self.engine = self.call(self._make_engine(), timeout=600)

    def call(self, coro: Awaitable[Any], timeout: Optional[float] = 120) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def add_app(self, config: Optional[ServerConfig] = None, sndbuf: Optional[int] = None, **app_kwargs: Any) -> str:
        """Serve a new app over the shared engine (with the server's header read timeout); returns its base
        URL. sndbuf: a small kernel send buffer for accepted connections (a client that stops reading
        blocks the server's writes sooner). app_kwargs go to build_app (register_adapter)."""
        config = config or ServerConfig()

        async def start() -> str:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            app = build_app(self.engine, config, **app_kwargs)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                   timeout_graceful_shutdown=1, access_log=False,
                                                   http=header_timeout_protocol(config.read_timeout_s)))
            self._servers.append(server)
            self._tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
            while not server.started:
                await asyncio.sleep(0.01)
            return f"http://127.0.0.1:{port}"

        return self.call(start())

    def close(self) -> None:
        async def stop() -> None:
            for s in self._servers:
                s.should_exit = True
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.engine.shutdown(grace_s=0.0)

        try:
            self.call(stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
