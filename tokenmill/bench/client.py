"""Streaming OpenAI-compatible HTTP client: sends one request, parses SSE, times every token.

Works against any OpenAI-compatible server (tokenmill, vLLM, llama-server). Never raises on a failed
request: the error goes into the RequestRecord.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

import aiohttp

from tokenmill.bench.types import BenchError, BenchRequest, RequestRecord

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def normalize_base_url(url: str) -> str:
    """'http://h:p', 'http://h:p/', 'http://h:p/v1' -> 'http://h:p' (BenchError when not an http(s) URL)."""
    url = url.strip().rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BenchError(f"bad --base-url {url!r}: expected http://HOST:PORT (optionally ending in /v1)")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


@dataclass
class ClientConfig:
    """Where and how to send requests."""

    base_url: str
    model: str
    endpoint: str = "chat"
    api_key: Optional[str] = None
    temperature: float = 0.0
    request_timeout_s: float = 3 * 3600.0

    def __post_init__(self) -> None:
        # Built once: these sit on the per-request hot path that adds to measured TTFT.
        self.url = self.base_url + ENDPOINTS[self.endpoint]
        self.headers = {"Content-Type": "application/json"}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"
        self.timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)


def make_session(max_connections: Optional[int] = None) -> aiohttp.ClientSession:
    """One keep-alive session for a whole benchmark (limit 0 = unlimited connections)."""
    connector = aiohttp.TCPConnector(limit=max_connections or 0, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


def messages_to_prompt(messages: list[dict[str, Any]]) -> str:
    """Flatten chat messages into one completions prompt (contents joined by blank lines)."""
    return "\n\n".join(str(m.get("content", "")) for m in messages)


def build_body(cfg: ClientConfig, req: BenchRequest, messages: Optional[list[dict[str, Any]]] = None,
               max_tokens: Optional[int] = None) -> dict[str, Any]:
    """The JSON body for `req` (or for explicit `messages`, e.g. a multi-turn history)."""
    msgs = messages if messages is not None else req.messages
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": max_tokens if max_tokens is not None else req.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = msgs if msgs is not None else [{"role": "user", "content": req.prompt or ""}]
    else:
        body["prompt"] = req.prompt if msgs is None else messages_to_prompt(msgs)
    if req.ignore_eos:
        body["ignore_eos"] = True
    if req.priority is not None:
        body["priority"] = req.priority
    if req.user is not None:
        body["user"] = req.user
    return body


def _piece(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


async def send_request(session: aiohttp.ClientSession, cfg: ClientConfig, body: dict[str, Any],
                       record: RequestRecord, t0: float) -> RequestRecord:
    """POST `body`, stream the reply and fill `record` (times relative to `t0`, a perf_counter value)."""
    chat = cfg.endpoint == "chat"
    payload = json.dumps(body).encode()
    parts: list[str] = []
    itl: list[float] = []
    first: Optional[float] = None
    start = time.perf_counter()
    last = start
    record.start_s = start - t0
    try:
        async with session.post(cfg.url, data=payload, headers=cfg.headers, timeout=cfg.timeout) as resp:
            record.status = resp.status
            if resp.status != 200:
                text = (await resp.text())[:300].replace("\n", " ")
                record.error = f"HTTP {resp.status}: {text}"
                return record
            async for raw in resp.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                if not data:
                    continue
                obj = json.loads(data)
                choices = obj.get("choices")
                if choices:
                    piece = _piece(choices[0], chat)
                    if piece:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            itl.append(now - last)
                        last = now
                        parts.append(piece)
                usage = obj.get("usage")
                if usage:
                    record.usage_prompt_tokens = usage.get("prompt_tokens")
                    record.usage_completion_tokens = usage.get("completion_tokens")
                if "error" in obj and not choices:
                    err = obj["error"]
                    record.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return record
        end = time.perf_counter()
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ValueError, OSError) as e:
        record.error = f"{type(e).__name__}: {e}"[:300]
        return record
    if first is None:
        record.error = "no output tokens received"
        return record
    record.ttft_s = first - start
    record.e2e_s = end - start
    record.itl_s = itl
    record.text = "".join(parts)
    record.output_tokens = record.usage_completion_tokens or (len(itl) + 1)
    record.success = True
    return record


async def fetch_model(session: aiohttp.ClientSession, base_url: str, api_key: Optional[str],
                      timeout_s: float = 10.0) -> Optional[str]:
    """GET /v1/models: the first model id, None when the server has no such route.

    Raises BenchError when the server cannot be reached at all.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(base_url + "/v1/models", headers=headers,
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            data = await resp.json(content_type=None)
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
        raise BenchError(f"cannot reach server at {base_url}: {type(e).__name__}: {e}") from None
    except (aiohttp.ClientError, ValueError):
        return None
    models = data.get("data") if isinstance(data, dict) else None
    if models and isinstance(models[0], dict) and models[0].get("id"):
        return str(models[0]["id"])
    return None
