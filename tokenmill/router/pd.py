"""Disaggregated prefill/decode in `tokenmill router --prefill URL ... --decode URL ...`.

A completion or chat request goes first to a prefill instance (`serve --kv-role producer`) that the routing
policy picks (with `prefix`, the one most likely to hold the prompt's prefix), as max_tokens 1, unstreamed,
with kv_transfer_params {"do_remote_decode": true, "transfer_id": T}: it runs the prompt, samples the first
token and holds the prompt's KV blocks. Its answer's kv_transfer_params go with the client's request to the
least-loaded decode instance (`--kv-role consumer`), which pulls the KV (or recomputes the prompt when the pull
fails) and continues; its response or stream is relayed as it comes, so the client sees one ordinary answer.
Either step is retried on another instance of its kind when one fails before answering. Every other route
goes to a decode instance. Each such request runs as one task (the prefill step awaits a whole response); a
client that goes away cancels it, which drops the prefill connection (the instance aborts the request).
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from tokenmill.disagg.params import prefill_request_body, split_request_error
from tokenmill.router.backends import RETRY_STATUS, BackendSet
from tokenmill.router.http import ClientConnection, Request, error_body
from tokenmill.router.policy import LeastLoad
from tokenmill.router.proxy import Outgoing, Relay
from tokenmill.router.upstream import UpstreamError, fetch

logger = logging.getLogger("tokenmill.router")


class _TaskExchange:
    """The client connection's exchange while the prefill step runs: a client that goes away cancels it."""

    def __init__(self, task: asyncio.Task):
        self.task = task

    def client_gone(self) -> None:
        self.task.cancel()

    def client_paused(self, paused: bool) -> None:
        pass  # nothing is written to the client during the prefill step


class PrefillDecode:
    def __init__(self, router: Any, prefill: BackendSet):
        self.router = router
        self.prefill = prefill
        self.decode_policy = LeastLoad()
        self.transfers = 0  # requests whose prefill answered with kv_transfer_params (then sent to decode)

    def start(self, conn: ClientConnection, req: Request, parsed: Any, hashes: list[int]) -> None:
        conn.exchange = _TaskExchange(asyncio.ensure_future(self._run(conn, req, parsed, hashes)))

    async def _run(self, conn: ClientConnection, req: Request, parsed: Any, hashes: list[int]) -> None:
        try:
            await self.generate(conn, req, parsed, hashes)
        except asyncio.CancelledError:
            pass  # the client went away
        except Exception as e:  # noqa: BLE001 - a bug answers 500
            logger.exception("disaggregated request failed")
            if not conn.closed and isinstance(conn.exchange, _TaskExchange):
                conn.respond(500, error_body(500, f"router error: {type(e).__name__}: {e}", "internal_error"),
                             keep_alive=False)

    async def generate(self, conn: ClientConnection, req: Request, parsed: Any, hashes: list[int]) -> None:
        r = self.router
        if parsed is None:
            conn.respond(400, error_body(400, "the body is not valid JSON", "invalid_json"))
            return
        bad = split_request_error(parsed)
        if bad is not None:
            conn.respond(400, error_body(400, bad[0], "unsupported", bad[1]))
            return
        transfer_id = f"disagg-{uuid.uuid4().hex}"
        out = Outgoing(req, json.dumps(prefill_request_body(parsed, transfer_id)).encode())
        tried: set[int] = set()
        while True:
            cands = [i for i in self.prefill.healthy() if i not in tried]
            if not cands:
                r.unroutable += 1
                down = "; ".join(f"{b.url}: {b.why_down or 'failed'}" for b in self.prefill.backends)
                conn.respond(503, error_body(503, f"no prefill instance is available ({down})", "no_backend"))
                return
            d = r.policy.choose(cands, self.prefill.loads, hashes)
            b = self.prefill.backends[d.backend]
            b.load.in_flight += 1
            try:
                status, headers, content = await fetch(r.pools[b.url], out.to)
            except UpstreamError as e:
                self._failed(b, tried, str(e))
                continue
            except BaseException:
                b.load.in_flight -= 1
                raise
            if status in RETRY_STATUS and len(cands) > 1:
                self._failed(b, tried, f"HTTP {status}")
                continue
            b.load.in_flight -= 1
            break
        b.requests += 1
        r.count_routed(d, hashes)
        r.policy.routed(b.index, hashes)
        if status != 200:  # the prefill instance's own answer (a bad request is a bad request there too)
            ctype = next((v for n, v in headers if n.lower() == b"content-type"), b"application/json")
            conn.respond(status, content, ctype)
            return
        try:
            kv = json.loads(content).get("kv_transfer_params")
        except (ValueError, AttributeError):
            kv = None
        if not isinstance(kv, dict):
            conn.respond(502, error_body(502, f"the prefill instance {b.url} answered without kv_transfer_params: "
                                              "is it started with --kv-role producer?", "bad_prefill_instance"))
            return
        self.transfers += 1
        dbody = json.dumps(dict(parsed, kv_transfer_params=kv)).encode()
        Relay(r, conn, req, dbody, r.set, self.decode_policy, [], False).dispatch()

    def _failed(self, b: Any, tried: set, why: str) -> None:
        """b failed before answering: release it, mark it down, let the caller try another."""
        r = self.router
        b.load.in_flight -= 1
        b.failures += 1
        r.retries += 1
        tried.add(b.index)
        self.prefill.mark_down(b, why)
