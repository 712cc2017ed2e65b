"""MoE architectures (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) through the engine vs transformers on tiny random
models: greedy tokens identical with batching, chunked prefill, preemption and prefix caching, with the device's
fused MoE op installed (fused_moe_cpu: float experts take its grouped path, packed GGUF experts its C kernel),
and routing counted per layer."""
from __future__ import annotations

import random

import pytest
import torch

from tests.exact import exact_llm
from tests.model.tiny_models import MOE_ARCHS, VOCAB, build_tiny_model, fake_quantize_, save_tiny_gguf, save_tiny_model
from tokenmill import SamplingParams
from tokenmill.model.layers.moe import PackedExperts, moe_blocks
from tokenmill.ops.moe.cpu import fused_moe_cpu

NEW_TOKENS = 10
SCENARIOS = {
    "batched": {},
    "chunked_prefill": {"max_num_batched_tokens": 8, "block_size": 4},
    "preemption": {"num_kv_blocks": 14, "block_size": 4},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for name in MOE_ARCHS:
        path = str(tmp_path_factory.mktemp(name))
        save_tiny_model(name, path)
        out[name] = (path, build_tiny_model(name), {})
    return out


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], cache: dict) -> list[int]:
    key = tuple(prompt)
    if key not in cache:
        ids = list(prompt)
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        cache[key] = ids[len(prompt):]
    return cache[key]


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 9, 26)]


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(tiny, gguf_tokenizer_path, arch, scenario):
    path, hf, cache = tiny[arch]
    prompts = _prompts()
    llm = exact_llm(path, tokenizer=gguf_tokenizer_path, dtype="float32", **SCENARIOS[scenario])
    model = llm.engine.core.runner.model
    assert all(block.op is fused_moe_cpu for _, block in moe_blocks(model))
    model.reset_expert_counts()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, cache), f"{arch}/{scenario}: {len(prompt)} tokens"
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0
    if scenario == "preemption":
        assert llm.engine.core.scheduler.num_preemptions > 0, "the scenario did not preempt"
    counts = model.expert_counts()
    top_k = moe_blocks(model)[0][1].top_k
    computed = sum(len(p) for p in prompts) + len(prompts) * (NEW_TOKENS - 1)  # at least; recompute adds more
    assert all(sum(c) >= computed * top_k and sum(c) % top_k == 0 for c in counts.values())


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_prefix_cache_hits_give_same_tokens(tiny, gguf_tokenizer_path, arch):
    path, hf, cache = tiny[arch]
    rng = random.Random(7)
    shared = [rng.randrange(3, VOCAB) for _ in range(21)]
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(k)] for k in (1, 5, 9)]
    llm = exact_llm(path, tokenizer=gguf_tokenizer_path, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts[:1]], params, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    kv = llm.engine.core.scheduler.kv
    assert kv.prefix_hits >= 2 * 20, "the second wave did not hit the prefix cache"
    for prompt, out in zip(prompts, first + rest):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, cache)
    assert kv.num_used_blocks == 0


@pytest.mark.parametrize("arch,qname", [("mixtral", "Q8_0"), ("qwen3_moe", "Q4_0")])
def test_quantized_gguf_greedy_matches_dequantized_transformers(tmp_path, gguf_tokenizer_path, arch, qname):
    """A GGUF with llama.cpp's 3-D expert tensors stored quantized: the engine keeps them packed (the C MoE kernel)
    and its greedy tokens equal transformers holding the dequantized weights, batched and chunked."""
    import gguf

    from tokenmill.ops.cpu.qlinear import available

    qtype = getattr(gguf.GGMLQuantizationType, qname)
    hf = build_tiny_model(arch)
    fake_quantize_(hf, "mlp.experts.", qtype)
    qtypes = {f"blk.{i}.ffn_{p}_exps.weight": qtype for i in range(hf.config.num_hidden_layers)
              for p in ("gate", "up", "down")}
    path = save_tiny_gguf(hf, str(tmp_path / f"{arch}.gguf"), qtypes=qtypes)
    llm = exact_llm(path, tokenizer=gguf_tokenizer_path, max_num_batched_tokens=16, block_size=4, gemm_dtype="float32")
    blocks = moe_blocks(llm.engine.core.runner.model)
    assert all(block.op is fused_moe_cpu for _, block in blocks)
    if available():
        assert all(isinstance(block.experts, PackedExperts) for _, block in blocks)
    prompts = _prompts(5)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    cache: dict = {}
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, cache)
