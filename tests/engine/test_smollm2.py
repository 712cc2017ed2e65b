"""The bundled default model end to end: greedy output vs transformers on the same GGUF, the Paris
answer, bad input that leaves the engine serving, and no leaked KV blocks."""
from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tests.conftest import hf_smollm2_oracle
from tests.exact import exact_llm

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def llm():
    # float32 GEMMs for prefill and float32 K/V (tests/exact.py): exact against transformers' float32 model (auto
    # picks bf16 GEMMs on AMX CPUs, bf16 K/V on AVX-512 ones; the default KV: tests/engine/test_kv_bf16_default.py)
    return exact_llm(max_model_len=1024, gemm_dtype="float32")


@pytest.fixture(scope="module")
def hf_model():
    return hf_smollm2_oracle()


@torch.no_grad()
def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_greedy_32_tokens_match_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    prompts = [llm.engine.processor.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, logit_bias={2: -100.0}), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref = _hf_greedy(hf_model, p, 32)
        assert o.outputs[0].token_ids == ref, (tok.decode(o.outputs[0].token_ids), tok.decode(ref))
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0


def test_bad_input_is_a_clear_error_and_engine_keeps_serving(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate("", SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(PromptTooLongError):
        llm.generate([[5] * 2000], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(InvalidRequestError):
        llm.generate([[10 ** 7]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0


def test_stop_string_not_in_text_and_blocks_freed(llm):
    p = SamplingParams(temperature=0, max_tokens=40, stop=["Paris"])
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], p, use_tqdm=False)[0]
    o = out.outputs[0]
    assert "Paris" not in o.text and o.finish_reason == "stop" and o.stop_reason == "Paris"
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0


def test_seed_reproducible_across_batch_mixes(llm):
    p = SamplingParams(temperature=1.0, top_k=50, max_tokens=16, seed=42)
    alone = llm.generate("Tell me a story", p, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["Other prompt one", "Tell me a story", "A third one"],
                         [SamplingParams(temperature=0.7, max_tokens=20), p, SamplingParams(max_tokens=8)],
                         use_tqdm=False)[1].outputs[0].token_ids
    assert alone == mixed


def test_n_samples_and_logprobs(llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=3, logprobs=2, prompt_logprobs=1)
    out = llm.generate("The weather today is", p, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in o.logprobs)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
