"""Disaggregated prefill/decode in `tokenmill router --prefill URL ... --decode URL ...`.

A completion or chat request goes first to a prefill instance (`serve --kv-role producer`) that the routing
policy picks (with `prefix`, the one most likely to hold the prompt's prefix), as max_tokens 1, unstreamed,
with kv_transfer_params {"do_remote_decode": true, "transfer_id": T}: it runs the prompt, samples the first
token and holds the prompt's KV blocks. Its answer's kv_transfer_params go with the client's request to the
least-loaded decode instance (`--kv-role consumer`), which pulls the KV (or recomputes the prompt when the pull
fails) and continues; its response or stream is relayed as it comes, so the client sees one ordinary answer.
Either step is retried on another instance of its kind when one fails before answering. Every other route
goes to a decode instance.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Optional

import aiohttp
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.disagg.params import prefill_request_body, split_request_error
from tokenmill.router.backends import RETRY_STATUS, BackendSet, _why
from tokenmill.router.policy import LeastLoad

def _error(status: int, message: str, code: str, param: Optional[str] = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


class PrefillDecode:
    def __init__(self, router: Any, prefill: BackendSet):
        self.router = router
        self.prefill = prefill
        self.decode_policy = LeastLoad()
        self.transfers = 0  # requests whose prefill answered with kv_transfer_params (then sent to decode)

    async def generate(self, request: Request, url_tail: str, headers: list, body: bytes, parsed: Any,
                       hashes: list[int]) -> Response:
        r = self.router
        if parsed is None:
            return _error(400, "the body is not valid JSON", "invalid_json")
        bad = split_request_error(parsed)
        if bad is not None:
            return _error(400, bad[0], "unsupported", bad[1])
        transfer_id = f"disagg-{uuid.uuid4().hex}"
        pbody = json.dumps(prefill_request_body(parsed, transfer_id)).encode()
        tried: set[int] = set()
        while True:
            cands = [i for i in self.prefill.healthy() if i not in tried]
            if not cands:
                r.unroutable += 1
                down = "; ".join(f"{b.url}: {b.why_down or 'failed'}" for b in self.prefill.backends)
                return _error(503, f"no prefill instance is available ({down})", "no_backend")
            d = r.policy.choose(cands, self.prefill.loads, hashes)
            b = self.prefill.backends[d.backend]
            b.load.in_flight += 1
            try:
                resp = await r._send(request, b.url + url_tail, headers, pbody)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                r._failed(b, tried, _why(e), self.prefill)
                continue
            except BaseException:
                b.load.in_flight -= 1
                raise
            if resp is None:  # the client went away; dropping the connection aborts the prefill
                b.load.in_flight -= 1
                return Response(status_code=499)
            try:
                status, content = resp.status, await resp.read()
                ctype = resp.headers.get("content-type", "application/json")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                resp.close()
                r._failed(b, tried, _why(e), self.prefill)
                continue
            if status in RETRY_STATUS and len(cands) > 1:
                r._failed(b, tried, f"HTTP {status}", self.prefill)
                continue
            b.load.in_flight -= 1
            break
        b.requests += 1
        r.count_routed(d, hashes)
        r.policy.routed(b.index, hashes)
        if status != 200:  # the prefill instance's own answer (a bad request is a bad request there too)
            return Response(content, status_code=status, media_type=ctype)
        try:
            kv = json.loads(content).get("kv_transfer_params")
        except (ValueError, AttributeError):
            kv = None
        if not isinstance(kv, dict):
            return _error(502, f"the prefill instance {b.url} answered without kv_transfer_params: is it started "
                               "with --kv-role producer?", "bad_prefill_instance")
        self.transfers += 1
        dbody = json.dumps(dict(parsed, kv_transfer_params=kv)).encode()
        return await r.relay(request, url_tail, headers, dbody, r.set, self.decode_policy, [], False)
