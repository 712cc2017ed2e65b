"""Schemathesis fuzzing of the OpenAPI schema (valid and invalid bodies): never a 5xx."""
from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fake_engine import FakeEngine  # noqa: E402

from tokenmill.server.app import build_app  # noqa: E402
from tokenmill.server.config import ServerConfig  # noqa: E402

# the schema does not depend on the engine: take it from an app over the fake one
SCHEMA = schemathesis.openapi.from_dict(build_app(FakeEngine(), ServerConfig()).openapi())
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
OPERATIONS = [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
              ("/health", "GET"), ("/version", "GET"), ("/v1/responses", "POST"), ("/v1/messages", "POST"),
              ("/v1/messages/count_tokens", "POST")]


def _bound(case: Any) -> None:
    """Keep generated requests cheap on a CPU engine: few tokens and samples (validity is unchanged)."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(key), int) and body[key] > 8:
                body[key] = 8
        if "max_tokens" not in body and "messages" in body:
            body["max_tokens"] = 8
        if "max_output_tokens" not in body and "input" in body:
            body["max_output_tokens"] = 8
        if isinstance(body.get("n"), int) and body["n"] > 4:
            body["n"] = 4
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 4:
            body["prompt"] = body["prompt"][:4]


def fuzz(url: str, path: str, method: str, max_examples: int) -> None:
    strategy = st.one_of(*[SCHEMA[path][method].as_strategy(generation_mode=m) for m in MODES])

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        _bound(case)
        response = case.call(base_url=url, timeout=60)
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert "error" in response.json(), response.text[:500]

    run()


@pytest.mark.parametrize("path,method", OPERATIONS)
def test_fuzz_fake_engine(fake_url: str, path: str, method: str) -> None:
    fuzz(fake_url, path, method, 60)


@pytest.mark.slow
@pytest.mark.parametrize("path,method", OPERATIONS[:2])
def test_fuzz_real_engine(real_url: str, path: str, method: str) -> None:
    fuzz(real_url, path, method, 40)
