"""tokenmill vs Hugging Face transformers on tiny random-weight models of real configs.

Greedy tokens must be identical, and logprobs close, whatever the scheduling: batching, chunked
prefill, preemption, max_num_seqs=1, prefix caching, speculative decoding. After every run all KV
blocks are back in the pool.
"""
from __future__ import annotations

import random

import pytest
import torch

from tests.exact import exact_llm
from tests.model.tiny_models import VOCAB, build_tiny_model, save_tiny_model
from tokenmill import LLM, SamplingParams

NEW_TOKENS = 12
ARCHS = ["llama", "qwen2", "mistral"]


_REF_CACHE: dict = {}


def reference(arch, hf, prompt):
    key = (arch, tuple(prompt))
    if key not in _REF_CACHE:
        _REF_CACHE[key] = hf_greedy(hf, prompt, NEW_TOKENS)
    return _REF_CACHE[key]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder, transformers model)."""
    out = {}
    for name in ARCHS:
        path = str(tmp_path_factory.mktemp(name))
        save_tiny_model(name, path)
        out[name] = (path, build_tiny_model(name))
    return out


def _prompts(seed: int = 0, n: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [3, 17, 9, 33, 1, 24, 40][:n]
    return [[rng.randrange(3, VOCAB) for _ in range(L)] for L in lens]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forward passes (no cache): the oracle. Also the chosen logprobs."""
    ids = list(prompt)
    lps = []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        tok = int(logits.argmax())
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        ids.append(tok)
    return ids[len(prompt):], lps


def _run(path: str, prompts, tokenizer_path, **engine_args):
    llm = exact_llm(path, tokenizer=tokenizer_path, dtype="float32", **engine_args)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    kv = llm.engine.core.scheduler.kv
    assert kv.num_used_blocks == 0, "KV blocks leaked"
    return outs, llm


SCENARIOS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 8, "block_size": 4},
    "preemption": {"num_kv_blocks": 16, "block_size": 4},
    "one_seq": {"max_num_seqs": 1},
    "no_prefix_cache": {"enable_prefix_caching": False, "max_num_batched_tokens": 16},
    "ngram_spec": {"speculative_method": "ngram", "num_speculative_tokens": 3},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(tiny, gguf_tokenizer_path, arch, scenario):
    path, hf = tiny[arch]
    prompts = _prompts()
    outs, llm = _run(path, prompts, gguf_tokenizer_path, **SCENARIOS[scenario])
    for prompt, out in zip(prompts, outs):
        ref, ref_lps = reference(arch, hf, prompt)
        got = out.outputs[0].token_ids
        assert got == ref, f"{arch}/{scenario}: prompt of {len(prompt)} tokens diverged"
        assert out.outputs[0].finish_reason == "length"
        lps = [lp.logprob for lp in out.outputs[0].logprobs]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-3
    if scenario == "preemption":
        assert llm.engine.core.scheduler.num_preemptions > 0, "the scenario did not preempt"


def test_prefix_cache_hits_give_same_tokens(tiny, gguf_tokenizer_path):
    """Requests sharing a long prefix, sent in two waves: the second wave hits the cache."""
    path, hf = tiny["llama"]
    rng = random.Random(7)
    shared = [rng.randrange(3, VOCAB) for _ in range(37)]
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(k)] for k in (1, 5, 11)]
    llm = exact_llm(path, tokenizer=gguf_tokenizer_path, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts[:1]], params, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    kv = llm.engine.core.scheduler.kv
    assert kv.prefix_hits >= 2 * 36, "the second wave did not hit the prefix cache"
    for prompt, out in zip(prompts, first + rest):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, NEW_TOKENS)[0]
    assert kv.num_used_blocks == 0


def test_resumed_after_preemption_seeded_sampling_identical(tiny, gguf_tokenizer_path):
    """Seeded random sampling gives the same tokens with and without preemption."""
    path, _ = tiny["qwen2"]
    prompts = _prompts(3)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=NEW_TOKENS, ignore_eos=True, seed=1234)
    la = LLM(path, tokenizer=gguf_tokenizer_path)
    lb = LLM(path, tokenizer=gguf_tokenizer_path, num_kv_blocks=16, block_size=4)
    ra = la.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    rb = lb.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert lb.engine.core.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in ra] == [o.outputs[0].token_ids for o in rb]
