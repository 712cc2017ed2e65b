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


# MoE under TP=2: experts split by intermediate rows (default) or whole experts per rank (expert parallelism);
# qwen2_moe has a shared expert (split like a dense MLP, reduced with the routed sum) and a dense layer 0
@pytest.mark.parametrize("arch,ep", [("qwen2_moe", False), ("qwen2_moe", True), ("mixtral", True),
                                     ("olmoe_gguf", True), ("olmoe_kv1_gguf", False)])
def test_moe_tp2_greedy_equals_tp1(tmp_path, gguf_tokenizer_path, arch, ep):
    """OLMoE's q / k norm spans the whole projection: its mean of squares is all-reduced over the ranks (with one
    KV head, replicated on both ranks, counted once)."""
    if arch.endswith("_gguf"):  # llama.cpp's 3-D ffn_*_exps tensors
        kw = {"num_key_value_heads": 1} if "_kv1" in arch else {}
        path = save_tiny_gguf(build_tiny_model(arch.split("_")[0], **kw), str(tmp_path / f"{arch}.gguf"))
    else:
        path = save_tiny_model(arch, str(tmp_path / arch))
    prompts = _prompts(len(arch) + ep)
    ref, _ = _generate(path, gguf_tokenizer_path, prompts)
    got, stats = _generate(path, gguf_tokenizer_path, prompts, tensor_parallel_size=2, enable_expert_parallel=ep)
    assert got == ref
    assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0 and stats["used"] == 0, stats


def test_expert_parallel_shards_whole_experts():
    """Rank 1 of 2 holds experts 4..7 whole; each checkpoint form lands in its local slots, others are skipped."""
    import torch

    from tokenmill.distributed.expert_parallel import IntermediateShardedExperts, LocalExperts
    from tokenmill.distributed.group import TPGroup

    tp = TPGroup(rank=1, world_size=2)
    full_gu, full_down = torch.randn(8, 2 * 6, 4), torch.randn(8, 4, 6)
    ep = LocalExperts(8, 4, 6, tp, torch.float32)
    assert ep.gate_up_proj.shape == (4, 12, 4) and ep.down_proj.shape == (4, 4, 6)
    assert ep._load_gate_up(ep.gate_up_proj, full_gu[2, :6], (2, 0)) == []  # rank 0's expert: skipped
    assert ep._load_gate_up(ep.gate_up_proj, full_gu[:, :6], "gate") == [(e, 0) for e in range(4, 8)]
    ep._load_gate_up(ep.gate_up_proj, full_gu[5, 6:], (5, 1))
    ep._load_down(ep.down_proj, full_down, None)
    assert torch.equal(ep.gate_up_proj[:, :6], full_gu[4:, :6]) and torch.equal(ep.gate_up_proj[1, 6:], full_gu[5, 6:])
    assert torch.equal(ep.down_proj, full_down[4:])
    tp_ex = IntermediateShardedExperts(8, 4, 6, tp, torch.float32)  # intermediate rows 3..5 of every expert
    tp_ex._load_gate_up(tp_ex.gate_up_proj, full_gu, None)
    tp_ex._load_down(tp_ex.down_proj, full_down[7], 7)
    assert torch.equal(tp_ex.gate_up_proj, torch.cat([full_gu[:, 3:6], full_gu[:, 9:12]], dim=1))
    assert torch.equal(tp_ex.down_proj[7], full_down[7, :, 3:6])
    with pytest.raises(ValueError, match="shape mismatch"):
        tp_ex._load_down(tp_ex.down_proj, full_down[:, :, :3], None)


def test_expert_parallel_on_a_dense_model_is_a_config_error(tmp_path, gguf_tokenizer_path):
    from tokenmill.errors import ConfigError

    path = save_tiny_model("llama", str(tmp_path / "llama"))
    with pytest.raises(ConfigError, match="enable_expert_parallel needs a mixture-of-experts model"):
        LLM(path, tokenizer=gguf_tokenizer_path, dtype="float32", enable_expert_parallel=True)
