"""Running the servers' event loop: uvloop where it is installed (as uvicorn[standard] does), else asyncio's."""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on a uvloop event loop when uvloop imports (less CPU per request and per streamed
    chunk), on the default loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
