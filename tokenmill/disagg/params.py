"""The kv_transfer_params of HTTP requests and responses (the proxy's handshake, vLLM's field name).

Prefill request: {"do_remote_decode": true, "transfer_id": T}, max_tokens 1, not streamed. Its response
carries {"do_remote_prefill": true, "transfer_id": T, "remote_host", "remote_port", "first_token_id"}: what
the decode request sends on to the decode instance, which pulls the KV from remote_host:remote_port.
"""
from __future__ import annotations

from typing import Any, Optional

from tokenmill.core.kv_transfer import PARAM, RemoteDecode, parse_kv_transfer_params
from tokenmill.errors import InvalidRequestError


def check_http_request(params: Optional[dict], stream: bool, num_prompts: int = 1) -> None:
    """HTTP-level checks (the engine checks the rest against its role): a prefill request is answered whole."""
    remote = parse_kv_transfer_params(params)
    if isinstance(remote, RemoteDecode) and stream:
        raise InvalidRequestError("a do_remote_decode request (the prefill side) cannot be streamed: its response "
                                  f"carries the {PARAM} for the decode side", param="stream")
    if remote is not None and num_prompts != 1:
        raise InvalidRequestError(f"{PARAM} needs exactly one prompt", param="prompt")


def prefill_request_body(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    """The client's request as sent to the prefill instance: one token, answered whole, with the handshake."""
    pb = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True, "transfer_id": transfer_id})
    pb.pop("max_completion_tokens", None)
    pb.pop("stream_options", None)
    if isinstance(pb.get("min_tokens"), int):
        pb["min_tokens"] = min(pb["min_tokens"], 1)
    return pb


def split_request_error(body: Any) -> Optional[tuple[str, Optional[str]]]:
    """(message, param) when a prefill/decode split cannot serve this request body, else None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object", None
    if body.get("kv_transfer_params") is not None:
        return "kv_transfer_params is set by the disaggregation proxy / router", "kv_transfer_params"
    if body.get("n", 1) not in (None, 1):
        return "disaggregated serving serves n = 1 only", "n"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
        return "disaggregated serving serves one prompt per request", "prompt"
    return None


def response_params(params: Optional[dict], token_ids: list[int], engine: Any) -> Optional[dict[str, Any]]:
    """The kv_transfer_params of a prefill instance's response (None for any other request)."""
    remote = parse_kv_transfer_params(params)
    if not isinstance(remote, RemoteDecode) or not token_ids:
        return None
    kt = engine.config.kv_transfer
    return {"do_remote_prefill": True, "transfer_id": remote.transfer_id, "remote_host": kt.kv_transfer_host,
            "remote_port": kt.kv_transfer_port, "first_token_id": int(token_ids[0])}
