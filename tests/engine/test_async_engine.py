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
