"""prompt_logprobs need every prompt token's logits: such a request must not take its prompt from the prefix
cache (a hit would leave the cached positions without logprobs)."""
from __future__ import annotations

import random

import pytest

from tests.model.tiny_models import VOCAB, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.request import Request


def test_kv_manager_gives_no_prefix_hit_to_prompt_logprobs():
    kv = KVCacheManager(16, 4, True)
    tokens = list(range(10, 30))
    first = Request("a", tokens, SamplingParams(max_tokens=1))
    assert kv.allocate_slots(first, len(tokens), []) is not None
    again = Request("b", tokens, SamplingParams(max_tokens=1))
    assert kv.get_computed_blocks(again)[1] > 0  # the prefix is cached
    scored = Request("c", tokens, SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert kv.get_computed_blocks(scored) == ([], 0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


def test_prompt_logprobs_after_a_cached_prefix_equal_uncached(tiny_path, gguf_tokenizer_path):
    rng = random.Random(3)
    prompt = [rng.randrange(3, VOCAB) for _ in range(40)]
    llm = LLM(tiny_path, tokenizer=gguf_tokenizer_path, dtype="float32", block_size=8)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    sp = SamplingParams(prompt_logprobs=2, max_tokens=1, temperature=0)
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None and all(lp is not None for lp in lps[1:])
    fresh = LLM(tiny_path, tokenizer=gguf_tokenizer_path, dtype="float32", block_size=8,
                enable_prefix_caching=False)
    ref = fresh.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].prompt_logprobs
    assert [lp.token_id for lp in lps[1:]] == prompt[1:]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(lps[1:], ref[1:])) < 1e-4
    # the next plain request still hits the cache
    assert llm.engine.core.scheduler.kv.get_computed_blocks(
        Request("d", prompt, SamplingParams(max_tokens=1)))[1] > 0
