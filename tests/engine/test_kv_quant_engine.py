"""kv_cache_dtype bfloat16 / int8 / fp8 through the whole engine on tiny random-weight models: prompt logprobs
close to the float32 cache, greedy continuations mostly equal, same scheduling features (chunked prefill,
prefix caching, preemption) working, no leaked blocks, and the memory accounting giving more blocks."""
from __future__ import annotations

import random

import pytest
import torch

from tests.model.tiny_models import VOCAB, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.ops.attention.kv_quant import QuantizedKVCache

ARCHS = ["llama", "mistral"]  # GQA + llama3 rope; MQA + sliding window
# bounds on |logprob(kv dtype) - logprob(float32 KV)| of the prompt tokens (tiny models with sharp attention)
MAX_LP_ERR = {"bfloat16": 0.03, "int8": 0.05, "fp8": 0.3}  # measured: bf16 0.006-0.01, int8 0.013-0.014
MEAN_LP_ERR = {"bfloat16": 0.005, "int8": 0.01, "fp8": 0.06}  # bf16 0.0015-0.0017, int8 0.004


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    return {a: save_tiny_model(a, str(tmp_path_factory.mktemp(a))) for a in ARCHS}


def _prompts(seed: int, lens: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lens]


def _llm(path: str, tok: str, kv: str, **kw) -> LLM:
    return LLM(path, tokenizer=tok, dtype="float32", kv_cache_dtype=kv, **kw)


def _prompt_lps(llm: LLM, prompts: list[list[int]]) -> list[list[float]]:
    sp = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0, "KV blocks leaked"
    return [[lp.logprob for lp in o.prompt_logprobs[1:]] for o in outs]


def _greedy(llm: LLM, prompts: list[list[int]], n: int = 8) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0, "KV blocks leaked"
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_and_greedy_close_to_float32(arch, tiny_paths, gguf_tokenizer_path):
    path = tiny_paths[arch]
    prompts = _prompts(1, [40, 7, 52])
    kw = dict(block_size=8, max_num_batched_tokens=32)  # prompts get chunked; decodes ride along
    base = _llm(path, gguf_tokenizer_path, "float32", **kw)
    base_lps, base_tok = _prompt_lps(base, prompts), _greedy(base, prompts)
    for kv in ("bfloat16", "int8", "fp8"):
        llm = _llm(path, gguf_tokenizer_path, kv, **kw)
        caches = llm.engine.core.runner.kv_caches
        if kv == "bfloat16":
            assert all(c.dtype == torch.bfloat16 for c in caches)
        else:
            assert all(isinstance(c, QuantizedKVCache) for c in caches)
        lps = _prompt_lps(llm, prompts)
        errs = [abs(a - b) for la, lb in zip(lps, base_lps) for a, b in zip(la, lb)]
        assert len(errs) == sum(len(p) - 1 for p in prompts)
        assert max(errs) < MAX_LP_ERR[kv], (kv, max(errs))
        assert sum(errs) / len(errs) < MEAN_LP_ERR[kv], (kv, sum(errs) / len(errs))
        assert max(errs) > 0  # the rounded cache is really used
        if kv == "fp8":
            continue  # e4m3 keeps 3 mantissa bits: it flips near-tied argmaxes of these sharp random models
        toks = _greedy(llm, prompts)
        # greedy: every request starts the same; tokens before the first divergence are most of them
        assert all(t[0] == b[0] for t, b in zip(toks, base_tok)), kv
        same_prefix = sum(next((i for i, (x, y) in enumerate(zip(t, b)) if x != y), len(t))
                          for t, b in zip(toks, base_tok))
        assert same_prefix >= 0.75 * sum(len(t) for t in toks), (kv, toks, base_tok)


def test_prefix_cache_and_preemption_with_quantized_cache(tiny_paths, gguf_tokenizer_path):
    """Shared prefixes hit the (quantized) prefix cache and a tiny pool forces preemption: results match
    a roomy run with prefix caching off, and every block comes back."""
    path, kv = tiny_paths["llama"], "int8"
    shared = _prompts(2, [24])[0]
    prompts = [shared + p for p in _prompts(3, [5, 9, 2, 13])]
    roomy = _greedy(_llm(path, gguf_tokenizer_path, kv, block_size=4, enable_prefix_caching=False), prompts)
    tight = _llm(path, gguf_tokenizer_path, kv, block_size=4, num_kv_blocks=16, max_num_seqs=4)
    assert _greedy(tight, prompts) == roomy
    sched = tight.engine.core.scheduler
    assert sched.num_preemptions > 0
    assert sched.kv.prefix_hits > 0


def test_same_memory_gives_more_blocks(tiny_paths, gguf_tokenizer_path):
    path = tiny_paths["llama"]
    gib = 64 * 1024 / (1 << 30)  # 64 KiB: small enough that the block cap does not bind
    runners = {kv: _llm(path, gguf_tokenizer_path, kv, kv_cache_memory=gib, block_size=4,
                        max_model_len=32).engine.core.runner for kv in ("auto", "float32", "bfloat16", "int8", "fp8")}
    # llama tiny: 3 layers, 2 KV heads, head_dim 16, fp32 -> 4 * 3 * 2 * 2 * 16 * 4 = 3072 B/block
    per_block = {"float32": 3072, "bfloat16": 1536, "int8": 4 * 3 * 2 * 2 * (16 + 4), "fp8": 4 * 3 * 2 * 2 * 16}
    for kv, want in per_block.items():
        assert runners[kv].kv_cache_dtype == kv
        assert runners[kv].kv_bytes_per_block() == want
        assert runners[kv].num_blocks == (64 * 1024) // want
    auto = runners["auto"]  # what auto resolved to on this machine, sized like that setting
    assert auto.kv_cache_dtype in ("float32", "bfloat16")
    assert auto.kv_bytes_per_block() == per_block[auto.kv_cache_dtype]
    allocated = sum(c.nbytes() for c in runners["int8"].kv_caches)
    assert allocated <= 64 * 1024
