"""tokenmill disagg-proxy against scripted backends (httpx.MockTransport): what it sends to each side, what it
returns, and its errors. Fast; the real pair is in test_disagg_live.py."""
from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from tokenmill.cli import main
from tokenmill.disagg.proxy import DisaggProxy, build_app, check_url

KV = {"do_remote_prefill": True, "transfer_id": "x", "remote_host": "127.0.0.1", "remote_port": 9,
      "first_token_id": 5}


def make(prefill_status=200, prefill_body=None):
    seen: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        seen.append((str(request.url), body))
        if request.url.port == 1:  # the prefill instance
            if prefill_status != 200:
                return httpx.Response(prefill_status, json={"error": {"message": "bad", "param": "temperature"}})
            kv = dict(KV, transfer_id=body["kv_transfer_params"]["transfer_id"])
            return httpx.Response(200, json=prefill_body if prefill_body is not None else
                                  {"choices": [{"text": "A"}], "kv_transfer_params": kv})
        if request.url.path == "/health":
            return httpx.Response(200)
        if body.get("stream"):
            return httpx.Response(200, content=b"data: {\"x\": 1}\n\ndata: [DONE]\n\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"choices": [{"text": "ABC"}], "path": request.url.path})

    proxy = DisaggProxy("http://127.0.0.1:1", "http://127.0.0.1:2")
    proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return TestClient(build_app(proxy)), seen


def test_pairs_prefill_then_decode():
    client, seen = make()
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 7, "min_tokens": 3,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ABC"
    (purl, pbody), (durl, dbody) = seen
    assert purl.startswith("http://127.0.0.1:1/v1/completions") and durl.startswith("http://127.0.0.1:2/")
    assert pbody["max_tokens"] == 1 and pbody["stream"] is False and pbody["min_tokens"] == 1
    assert "stream_options" not in pbody
    assert pbody["kv_transfer_params"]["do_remote_decode"] is True
    assert dbody["max_tokens"] == 7 and dbody["min_tokens"] == 3
    assert dbody["kv_transfer_params"]["transfer_id"] == pbody["kv_transfer_params"]["transfer_id"]


def test_stream_and_chat_pass_through():
    client, seen = make()
    r = client.post("/v1/chat/completions", json={"messages": [], "max_completion_tokens": 9, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert "max_completion_tokens" not in seen[0][1] and seen[0][1]["max_tokens"] == 1
    assert seen[1][1]["max_completion_tokens"] == 9 and seen[1][1]["stream"] is True


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "kv_transfer_params": {}}, "kv_transfer_params"),
    ({"prompt": ["a", "b"]}, "prompt"),
])
def test_bad_requests(body, param):
    client, seen = make()
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and not seen


def test_prefill_errors_come_back_as_they_are():
    client, seen = make(prefill_status=400)
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature" and len(seen) == 1
    client, _ = make(prefill_body={"choices": []})
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 502 and "producer" in r.json()["error"]["message"]


def test_bad_urls_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="--prefill"):
        check_url("prefill", "127.0.0.1:8000")
    assert check_url("decode", "http://h:1/") == "http://h:1"
    assert main(["disagg-proxy", "--prefill", "ftp://x", "--decode", "http://127.0.0.1:2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--prefill" in err
