"""EngineCore talks to the model only through an Executor: facts from the load handshake, steps through
SchedulerOutput / ModelRunnerOutput, a failed step's runner state dropped through the next schedule's
finished ids."""
from __future__ import annotations

import dataclasses
import pickle

import pytest

from tests.model.tiny_models import save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.executor.base import ModelInfo
from tokenmill.executor.uniproc import UniProcExecutor


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


class _Recording(UniProcExecutor):
    """The in-process executor with a handshake that caps max_model_len, failing chosen steps."""

    def __init__(self, config, cap: int):
        super().__init__(config)
        self.cap, self.fail_next, self.seen = cap, 0, []

    def load(self) -> ModelInfo:
        return dataclasses.replace(super().load(), max_model_len=self.cap, eos_token_ids=(7,))

    def execute_model(self, sched):
        self.seen.append(sched)
        if self.fail_next and sched.total_num_scheduled_tokens:
            self.fail_next -= 1
            super().execute_model(sched)  # the runner holds state for the step's requests ...
            raise RuntimeError("injected fault")  # ... and then the step fails
        return super().execute_model(sched)


def _engine(path, gguf_tokenizer_path, cap=40):
    cfg = EngineConfig.from_kwargs(model=path, tokenizer=gguf_tokenizer_path, dtype="float32")
    eng = LLMEngine(cfg)
    eng.core.executor = ex = _Recording(cfg, cap)
    eng.load()
    return eng, ex


def _run(eng, rid, prompt, n=4):
    eng.add_request(rid, None, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), prompt_token_ids=prompt)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    return outs


def test_engine_reads_model_facts_from_the_handshake(llama_path, gguf_tokenizer_path):
    eng, ex = _engine(llama_path, gguf_tokenizer_path, cap=40)
    assert eng.max_model_len == 40 and eng.core.scheduler.max_model_len == 40
    assert eng.processor.max_model_len == 40  # validation uses the handshake, not the runner's 512
    assert 7 in eng.eos_token_ids  # the model-config EOS ids come from the handshake
    assert eng.core.scheduler.kv.num_total_blocks == ex.runner.num_blocks - 1  # less the null block
    info = ex.load()
    assert pickle.loads(pickle.dumps(info)) == info  # crosses a process boundary as is


def test_failed_step_state_is_dropped_through_finished_ids(llama_path, gguf_tokenizer_path):
    eng, ex = _engine(llama_path, gguf_tokenizer_path)
    ex.fail_next = 1
    (out,) = _run(eng, "a", [5, 6, 7, 8, 9])
    assert out.outputs[0].finish_reason == "error" and "injected fault" in out.error
    assert "a" in ex.seen[-1].finished_req_ids  # the runner was told through the schedule ...
    assert "a" not in ex.runner.states  # ... and dropped the request's state
    (ok,) = _run(eng, "b", [5, 6, 7, 8, 9])
    assert len(ok.outputs[0].token_ids) == 4 and ok.outputs[0].finish_reason == "length"
    assert eng.core.scheduler.kv.num_used_blocks == 0


def test_llm_runs_through_the_in_process_executor(llama_path, gguf_tokenizer_path):
    llm = LLM(llama_path, tokenizer=gguf_tokenizer_path, dtype="float32")
    assert isinstance(llm.engine.core.executor, UniProcExecutor)
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(temperature=0, max_tokens=3,
                                                                       ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    llm.shutdown()
