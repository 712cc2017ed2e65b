"""AsyncEngine.from_config loads the model on the engine thread and steps it there: one thread starts every
torch / OpenMP parallel region of the process. With the load on the caller's thread, libgomp kept two
worker pools, stopped spinning between regions, and each decode step of the server ran 1.7-2x slower
than offline (bench/http_overhead.py: 34 vs 20 ms per token at batch 1)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from tests.model.tiny_models import save_tiny_model
from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import ModelLoadError
from tokenmill.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("llama"))
    save_tiny_model("llama", path)
    return path


def _config(path: str) -> EngineConfig:
    return EngineConfig.from_kwargs(model=path, dtype="float32", block_size=4, skip_tokenizer_init=True)


def test_load_and_steps_on_one_engine_thread(tiny_dir, monkeypatch):
    threads: dict[str, set[int]] = {"load": set(), "step": set()}
    real_load = LLMEngine.load

    def load(self):
        threads["load"].add(threading.get_ident())
        real_load(self)

    monkeypatch.setattr(LLMEngine, "load", load)
    engine = AsyncEngine.from_config(_config(tiny_dir))
    runner = engine.engine.core.runner
    real_execute = runner.execute_model

    def execute_model(sched):
        threads["step"].add(threading.get_ident())
        return real_execute(sched)

    runner.execute_model = execute_model

    async def run() -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        last = None
        async for out in engine.generate(None, params, "r0", prompt_token_ids=[5, 6, 7, 8, 9]):
            last = out
        await engine.shutdown(grace_s=1.0)
        return last.outputs[0].token_ids

    assert len(asyncio.run(run())) == 5
    assert len(threads["load"]) == 1 and threads["load"] == threads["step"]
    assert threads["load"] != {threading.get_ident()}
    assert not engine.is_alive


def test_load_error_raised_to_caller(tmp_path):
    with pytest.raises(ModelLoadError):
        AsyncEngine.from_config(_config(str(tmp_path / "missing")))


def test_shutdown_before_start_ends_the_thread(tiny_dir):
    engine = AsyncEngine.from_config(_config(tiny_dir))
    assert engine.is_alive  # loaded, waiting for start()
    asyncio.run(engine.shutdown(grace_s=0.1))
    assert not engine.is_alive


def test_slow_consumer_gets_merged_deltas_not_a_queue_of_copies(tiny_dir):
    """A consumer that stops reading a DELTA stream finds one pending output holding everything since
    its last read (memory linear in the output), not one cumulative copy per step."""
    from tokenmill.sampling_params import RequestOutputKind

    engine = AsyncEngine.from_config(_config(tiny_dir))

    async def run() -> tuple[int, list[int], list[int]]:
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        gen = engine.generate(None, params, "slow", prompt_token_ids=[5, 6, 7, 8, 9])
        first = await gen.__anext__()
        ids = list(first.outputs[0].token_ids)
        while engine.engine.has_unfinished_requests():  # the client reads nothing while the rest runs
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        items = 0
        async for out in gen:
            items += 1
            ids += out.outputs[0].token_ids
            assert out.outputs[0].text == out.outputs[0].delta_text
        cumulative = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        full = None
        async for out in engine.generate(None, cumulative, "full", prompt_token_ids=[5, 6, 7, 8, 9]):
            full = out
        await engine.shutdown(grace_s=1.0)
        return items, ids, full.outputs[0].token_ids

    items, ids, full = asyncio.run(run())
    assert items == 1
    assert ids == full and len(ids) == 40
