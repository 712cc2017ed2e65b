"""The CPU offload tier on CUDA: pinned host memory, non_blocking copies ordered with the forward; greedy
tokens with forced preemption equal the run without the tier. Skipped without CUDA."""
from __future__ import annotations

import random

import pytest
import torch

from tests.model.tiny_models import VOCAB, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.worker.kv_offload import HostKVTier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_tier_round_trip_cuda():
    dev = torch.device("cuda")
    caches = allocate_kv_cache(2, 12, 16, 2, 64, torch.bfloat16, dev)
    for c in caches:
        c.normal_()
    per_block = 2 * 16 * 2 * 2 * 64 * 2
    tier = HostKVTier.create(8 * per_block / (1 << 30), caches, per_block, dev)
    assert tier.host.is_pinned() and tier.num_host_blocks == 8
    want = [c[:, [1, 2, 3, 9]].clone() for c in caches]
    tier.apply([(1, 4), (2, 5), (3, 0)], [])
    # one step: block 9 goes out to host 4 (overwriting block 1's copy) before host 4, 5, 0 come back
    tier.apply([(9, 4)], [(4, 8), (5, 10), (0, 11)])
    torch.cuda.synchronize()
    for c, w in zip(caches, want):
        assert torch.equal(c[:, 8], w[:, 3]) and torch.equal(c[:, 10], w[:, 1]) and torch.equal(c[:, 11], w[:, 2])


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_offload_engine_cuda(tmp_path, kv):
    path = save_tiny_model("llama", str(tmp_path / "llama"))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (40, 70, 25, 90, 55)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    args = dict(device="cuda", block_size=16, num_kv_blocks=14, max_model_len=160, enable_prefix_caching=False,
                skip_tokenizer_init=True, kv_cache_dtype=kv)
    runs = []
    for gb in (0, 0.01):
        llm = LLM(path, cpu_offload_gb=gb, **args)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
        sched = llm.engine.core.scheduler
        assert sched.num_preemptions > 0 and sched.kv.num_used_blocks == 0
    assert runs[0] == runs[1]
    off = sched.kv.offload
    assert off.num_swapped_in_blocks > 0 and off.num_free_host_blocks == off.num_host_blocks
