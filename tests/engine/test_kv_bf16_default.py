"""The default KV cache (kv_cache_dtype auto) on the bundled SmolLM2 GGUF: bfloat16 where the CPU attention kernel
reads bf16 K/V in place (AVX-512), float32 elsewhere, as resolve_kv_cache_dtype says; the engine reports what
it resolved to; greedy chat answers follow the float32-KV engine's (the first 16 tokens of every answer, and most
tokens before the first divergence); streaming eviction works on it."""
from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.ops.attention.kv_quant import plain_kv_dtype, resolve_kv_cache_dtype
from tokenmill.ops.cpu.attention import reads_kv_in_place

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
             "Explain what a CPU cache is in two sentences.", "List the first five prime numbers.",
             "Who wrote Pride and Prejudice?"]
SAME_PREFIX = 16


def _llm(**kw) -> LLM:
    # float32 GEMMs in both: the runs differ by the KV cache only
    return LLM(max_model_len=512, enable_prefix_caching=False, gemm_dtype="float32", kv_cache_memory=0.05, **kw)


@pytest.fixture(scope="module")
def answers() -> dict:
    """kv_cache_dtype -> (resolved dtype, runner facts, greedy answers)."""
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sp = SamplingParams(temperature=0, max_tokens=48)
    out = {}
    for kv in ("auto", "float32"):
        llm = _llm(kv_cache_dtype=kv)
        runner = llm.engine.core.runner
        bf16_in_place = (runner.device_setup.backend_name == "cpu"
                         and reads_kv_in_place(torch.bfloat16, runner.model.head_dim))
        toks = [o.outputs[0].token_ids for o in llm.chat(msgs, sp, use_tqdm=False)]
        assert llm.engine.core.scheduler.kv.num_used_blocks == 0
        out[kv] = dict(info=llm.engine.core.info.kv_cache_dtype, runner=runner.kv_cache_dtype,
                       cache=runner.kv_caches[0].dtype, bf16_in_place=bf16_in_place, tokens=toks)
        del llm, runner
    return out


def test_auto_is_what_the_resolution_says_and_is_reported(answers):
    auto, f32 = answers["auto"], answers["float32"]
    want = resolve_kv_cache_dtype("auto", torch.float32, "cpu", auto["bf16_in_place"])
    assert auto["runner"] == auto["info"] == want and auto["cache"] == plain_kv_dtype(want)
    if reads_kv_in_place(torch.bfloat16, 64):  # SmolLM2: head_dim 64; an AVX-512 CPU with the kernel built
        assert want == "bfloat16"
    assert f32["runner"] == f32["info"] == "float32" and f32["cache"] == torch.float32


def test_greedy_answers_follow_float32_kv(answers):
    got, want = answers["auto"]["tokens"], answers["float32"]["tokens"]
    same = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(got, want)]
    for s, a, b in zip(same, got, want):
        assert s >= min(SAME_PREFIX, len(a), len(b)), (s, a, b)
    assert sum(same) >= 0.85 * sum(len(b) for b in want), (same, [len(b) for b in want])


def test_streaming_eviction_on_the_default_cache():
    llm = LLM(max_model_len=256, enable_prefix_caching=False, kv_cache_memory=0.05, streaming_sink_tokens=16,
              streaming_window_tokens=64)
    assert llm.engine.core.streaming_max_prompt_tokens() is not None  # not refused: a plain cache re-rotates
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, kv_eviction="streaming")
    out = llm.generate(["Once upon a time"], sp, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 200 and len(set(out.token_ids[-50:])) > 1
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0
