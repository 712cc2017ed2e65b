"""Expert offload on CUDA (--moe-expert-cache-gb): experts pinned on the host, a few slots on the GPU, fetches on
the compute stream, admissions and prefetches on the side stream; greedy tokens equal the run with every expert
on the GPU, for each forced path. Skipped without CUDA (written without one: never run yet)."""
from __future__ import annotations

import random

import pytest
import torch

from tests.model.tiny_models import VOCAB, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.core.expert_cache import ExpertCostModel
from tokenmill.model.layers.expert_offload import ExpertOffload, expert_nbytes
from tokenmill.model.layers.moe import moe_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HOST = ExpertCostModel(expert_bytes=1000, flops_per_token=1, link_bytes_per_s=1.0, host_bytes_per_s=1e12,
                       host_flops=1e12)
FETCH = ExpertCostModel(expert_bytes=1000, flops_per_token=1, link_bytes_per_s=1e12, host_bytes_per_s=1.0)


def _greedy(llm: LLM) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 9, 26)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                            use_tqdm=False)]


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_cache_gb_flag_matches_all_experts_on_gpu(tmp_path, gguf_tokenizer_path, arch):
    path = save_tiny_model(arch, str(tmp_path / arch))
    args = dict(tokenizer=gguf_tokenizer_path, dtype="float32", device="cuda", enable_prefix_caching=False)
    want = _greedy(LLM(path, **args))
    probe = LLM(path, **args)
    one = expert_nbytes(moe_blocks(probe.engine.core.runner.model)[0][1].experts)
    del probe
    llm = LLM(path, moe_expert_cache_gb=3.5 * one / 2**30, moe_expert_prefetch=True, **args)
    model = llm.engine.core.runner.model
    off = model.expert_offload
    assert off.policy.capacity == 3 and off.pool.gate_up_proj.is_cuda
    assert all(not b.experts.gate_up_proj.is_cuda and b.experts.gate_up_proj.is_pinned() for _, b in moe_blocks(model))
    assert _greedy(llm) == want
    for cost in (HOST, FETCH):  # each path forced, prefetch on (the side stream)
        ExpertOffload.install(model, 3, torch.device("cuda"), cost=cost, prefetch=True)
        assert _greedy(llm) == want, cost
        s = model.expert_offload.stats
        assert (s.host_tokens if cost is HOST else s.fetches) > 0
