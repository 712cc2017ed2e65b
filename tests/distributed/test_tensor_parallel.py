"""Tensor parallelism on the CPU (gloo, one worker process per rank), float32: greedy tokens of TP=2 equal
TP=1 for tiny Llama and Qwen2 models (safetensors and GGUF), with chunked prefill, preemption and prefix-cache
hits in the same run, and for a model with fewer KV heads than ranks (the KV head replicated, an odd
vocabulary padded)."""
from __future__ import annotations

import random

import pytest

from tests.model.tiny_models import VOCAB, build_tiny_model, save_tiny_gguf, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.executor.multiproc import MultiprocExecutor

NEW_TOKENS = 10
# chunks of 8 tokens, 16 blocks of 4 for 6 requests (preemption), a shared 24-token prefix (cache hits)
STRESS = {"max_num_batched_tokens": 8, "block_size": 4, "num_kv_blocks": 16, "enable_prefix_caching": True}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB - 1) for _ in range(24)]
    return [shared + [rng.randrange(3, VOCAB - 1) for _ in range(k)] for k in (1, 9, 3, 14, 6, 2)]


def _generate(path, tokenizer, prompts, **kw):
    llm = LLM(path, tokenizer=tokenizer, dtype="float32", **STRESS, **kw)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        first = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # fills the cache
        rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
        s = llm.engine.core.scheduler
        stats = {"preemptions": s.num_preemptions, "prefix_hits": s.kv.prefix_hits, "used": s.kv.num_used_blocks,
                 "executor": type(llm.engine.core.executor)}
        return [o.outputs[0].token_ids for o in first + rest], stats
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama_mqa", "qwen2_gguf"])
def test_tp2_greedy_equals_tp1(tmp_path, gguf_tokenizer_path, arch):
    if arch.endswith("_gguf"):  # an F32 GGUF: every rank reads the file and keeps its slices
        path = save_tiny_gguf(build_tiny_model(arch[:-5]), str(tmp_path / f"{arch}.gguf"))
    else:  # safetensors: every rank reads only its slices
        path = save_tiny_model(arch, str(tmp_path / arch))
    prompts = _prompts(len(arch))
    ref, ref_stats = _generate(path, gguf_tokenizer_path, prompts)
    got, stats = _generate(path, gguf_tokenizer_path, prompts, tensor_parallel_size=2)
    assert stats["executor"] is MultiprocExecutor
    assert got == ref
    assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0, stats
    assert stats["used"] == 0


def test_a_dead_rank_stops_the_engine_without_a_hang(tmp_path, gguf_tokenizer_path):
    import os
    import signal

    from tokenmill.executor.base import ExecutorDeadError

    path = save_tiny_model("llama", str(tmp_path / "llama"))
    llm = LLM(path, tokenizer=gguf_tokenizer_path, dtype="float32", tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        rank1 = llm.engine.core.executor._procs[1]
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(30)
        with pytest.raises(ExecutorDeadError, match="rank 1"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    finally:
        llm.shutdown()
