"""Constrained requests through the AsyncEngine (the server's path): compiled off the step loop while other
requests run, bad specs refused at submission, outputs valid."""
from __future__ import annotations

import asyncio
import json

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def test_async_engine_serves_constrained_and_free_requests_together():
    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(max_model_len=512))
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]}

    async def one(rid: str, prompt: str, params: SamplingParams):
        last = None
        async for out in engine.generate(prompt, params, rid):
            last = out
        return last.outputs[0]

    async def run():
        with pytest.raises(InvalidRequestError) as e:
            await one("bad", "hi", SamplingParams(max_tokens=4, structured_outputs={"regex": "(("}))
        assert e.value.param == "structured_outputs.regex"
        outs = await asyncio.gather(
            one("json", "Weather report as JSON:", SamplingParams(temperature=0, max_tokens=60, structured_outputs={
                "json": schema, "disable_any_whitespace": True})),
            one("choice", "Is water wet?", SamplingParams(temperature=0, max_tokens=10,
                                                          structured_outputs={"choice": ["yes", "no"]})),
            one("free", "Once upon a time", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
        await engine.shutdown(grace_s=1.0)
        return outs

    js, choice, free = asyncio.run(run())
    assert js.finish_reason == "stop" and set(json.loads(js.text)) == {"city", "sunny"}
    assert choice.finish_reason == "stop" and choice.text in ("yes", "no")
    assert free.finish_reason == "length" and len(free.token_ids) == 12
