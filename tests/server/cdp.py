"""A tiny headless-Chromium driver over the DevTools protocol (aiohttp websocket; no downloads)."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
from typing import Any, Optional

import aiohttp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1100,800"]


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page; use as `async with Browser(path) as b:`."""

    def __init__(self, executable: str):
        self.executable = executable
        self._ids = itertools.count(1)
        self._proc: Optional[subprocess.Popen] = None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._ws: Any = None

    async def __aenter__(self) -> "Browser":
        self._tmp = tempfile.TemporaryDirectory(prefix="tm-chromium-")
        self._proc = subprocess.Popen([self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._tmp.name}",
                                       "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port = await asyncio.get_running_loop().run_in_executor(None, self._read_port)
        self._session = aiohttp.ClientSession()
        for _ in range(100):
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", raw)
            if m:
                return int(m.group(1))
        raise RuntimeError("chromium exited before opening its DevTools port")

    async def __aexit__(self, *exc: Any) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self._ws.receive()).data)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll a JS expression until it is truthy."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise TimeoutError(f"timed out waiting for: {expression}")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def type_text(self, text: str) -> None:
        await self.send("Input.insertText", text=text)

    async def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                            windowsVirtualKeyCode=13, nativeVirtualKeyCode=13, text="\r" if kind == "keyDown" else "")

    async def screenshot(self, path: str) -> None:
        data = (await self.send("Page.captureScreenshot", format="png"))["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
