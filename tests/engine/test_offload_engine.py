"""The CPU offload tier (cpu_offload_gb) through the whole engine on a tiny random Llama: with forced
preemption the swapped requests resume by copy (nothing recomputed) and greedy tokens equal transformers
and the run without the tier; evicted prefix blocks come back from the host as hits; every device and host
block is free at the end. On this CPU-only machine the tier copies between two CPU tensors."""
from __future__ import annotations

import random

import pytest

from tests.engine.test_correctness import hf_greedy
from tests.exact import exact_llm
from tests.model.tiny_models import VOCAB, build_tiny_model, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.server.metrics import ServerMetrics

NEW = 10
# tiny llama, block_size 4: 4 tokens * 3 layers * 2 (K, V) * 2 heads * (16 fp32 | bf16 | int8 + a 4-byte scale)
BYTES_PER_BLOCK = {"float32": 4 * 3 * 2 * 2 * 16 * 4, "bfloat16": 4 * 3 * 2 * 2 * 16 * 2,
                   "int8": 4 * 3 * 2 * 2 * (16 + 4)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, greedy reference by transformers, memoized per prompt)."""
    path = str(tmp_path_factory.mktemp("llama"))
    save_tiny_model("llama", path)
    hf, memo = build_tiny_model("llama"), {}

    def ref(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in memo:
            memo[tuple(prompt)] = hf_greedy(hf, prompt, NEW)[0]
        return memo[tuple(prompt)]

    return path, ref


def _prompts(seed: int, lens: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lens]


def _gib(blocks: int, kv_dtype: str = "float32") -> float:
    return blocks * BYTES_PER_BLOCK[kv_dtype] / (1 << 30)


def _llm(path: str, tok: str, **kw) -> LLM:
    """float32 K/V unless kw says otherwise: the tokens are compared with transformers (tests/exact.py)."""
    return exact_llm(path, tokenizer=tok, dtype="float32", block_size=4, skip_tokenizer_init=True, **kw)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _count_scheduled(llm: LLM) -> list[int]:
    """Wrap the runner so every step's scheduled token count is recorded."""
    runner, seen = llm.engine.core.runner, []
    inner = runner.execute_model

    def execute_model(sched):
        seen.append(sched.total_num_scheduled_tokens)
        return inner(sched)

    runner.execute_model = execute_model
    return seen


def _assert_all_free(llm: LLM) -> None:
    kv = llm.engine.core.scheduler.kv
    assert kv.num_used_blocks == 0, "device KV blocks leaked"
    off = kv.offload
    assert off.num_free_host_blocks == off.num_host_blocks and not off.swapped, "host KV blocks leaked"


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_preemption_swaps_instead_of_recomputing(tiny, gguf_tokenizer_path, kv_dtype):
    path, hf = tiny
    prompts = _prompts(0, [17, 9, 33, 24, 13])
    kw = dict(num_kv_blocks=16, max_num_batched_tokens=64, enable_prefix_caching=False, kv_cache_dtype=kv_dtype)
    plain = _llm(path, gguf_tokenizer_path, **kw)
    want = _generate(plain, prompts)
    assert plain.engine.core.scheduler.num_preemptions > 0, "the scenario does not preempt"
    if kv_dtype == "float32":
        assert want == [hf(p) for p in prompts]
    llm = _llm(path, gguf_tokenizer_path, cpu_offload_gb=_gib(64, kv_dtype), **kw)
    assert llm.engine.core.runner.num_host_blocks == 64
    steps = _count_scheduled(llm)
    assert _generate(llm, prompts) == want
    sched = llm.engine.core.scheduler
    off = sched.kv.offload
    assert sched.num_preemptions > 0 and off.num_swap_preemptions == sched.num_preemptions
    assert off.num_swapped_out_blocks > 0 and off.num_swapped_in_blocks == off.num_swapped_out_blocks
    # nothing recomputed: each prompt token and each fed-back output token is computed exactly once
    assert sum(steps) == sum(len(p) + NEW - 1 for p in prompts)
    stats = llm.engine.core.stats()
    assert stats.kv_offload_swapped_out_blocks == off.num_swapped_out_blocks > 0
    text = ServerMetrics(llm.engine.core.stats).render().decode()
    assert f"tokenmill:kv_offload_swapped_in_blocks_total {float(off.num_swapped_in_blocks)}" in text
    _assert_all_free(llm)


def test_host_too_small_falls_back_to_recompute(tiny, gguf_tokenizer_path):
    path, hf = tiny
    prompts = _prompts(0, [17, 9, 33, 24, 13])
    llm = _llm(path, gguf_tokenizer_path, num_kv_blocks=16, max_num_batched_tokens=64, enable_prefix_caching=False,
               cpu_offload_gb=_gib(1))
    steps = _count_scheduled(llm)
    assert _generate(llm, prompts) == [hf(p) for p in prompts]
    sched = llm.engine.core.scheduler
    assert sched.num_preemptions > sched.kv.offload.num_swap_preemptions
    assert sum(steps) > sum(len(p) + NEW - 1 for p in prompts)  # some recompute happened
    _assert_all_free(llm)


def test_evicted_prefix_blocks_hit_back_from_host(tiny, gguf_tokenizer_path):
    """Wave 1 caches a shared 32-token prefix; wave 2 (unrelated prompts) evicts it from the 16-block
    device cache to the host; wave 3 (the shared prefix + new suffixes, partial hits) swaps it back in.
    Tokens equal transformers and a run with prefix caching off."""
    path, hf = tiny
    shared = _prompts(5, [32])[0]
    wave1 = [shared + [7]]
    wave2 = _prompts(6, [30, 27])
    wave3 = [shared + s for s in _prompts(7, [3, 6])] + [shared[:13] + [9, 9]]  # full, full, partial prefix
    off_run = _llm(path, gguf_tokenizer_path, enable_prefix_caching=False)
    want = [_generate(off_run, w) for w in (wave1, wave2, wave3)]
    assert want[2] == [hf(p) for p in wave3]
    llm = _llm(path, gguf_tokenizer_path, num_kv_blocks=17, max_num_seqs=1, cpu_offload_gb=_gib(32))
    assert _generate(llm, wave1) == want[0]
    kv = llm.engine.core.scheduler.kv
    assert kv.offload.num_swapped_out_blocks == 0
    assert _generate(llm, wave2) == want[1]
    assert kv.offload.num_swapped_out_blocks >= 8, "wave 2 did not evict the shared prefix to the host"
    hits_before = kv.prefix_hits
    steps = _count_scheduled(llm)
    assert _generate(llm, wave3) == want[2]
    # the first wave-3 request restores the 8 shared blocks from the host; the others hit them on device
    assert kv.offload.num_prefix_hit_tokens >= 32 and kv.offload.num_swapped_in_blocks >= 8
    assert kv.prefix_hits - hits_before >= 32 + 32 + 12
    assert sum(steps) == sum(len(p) + NEW - 1 for p in wave3) - (kv.prefix_hits - hits_before)
    assert llm.engine.core.stats().kv_offload_prefix_hits == kv.offload.num_prefix_hit_tokens
    _assert_all_free(llm)
