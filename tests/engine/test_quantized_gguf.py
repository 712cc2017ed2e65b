"""The bundled SmolLM2 Q4_1 GGUF kept packed (quantization auto, the CPU kernels) gives the same greedy tokens as
dequantized at load (quantization none), single requests and a batch of concurrent ones; with bfloat16 GEMMs for
the large calls (gemm_dtype, the default on CPUs with bf16 matrix instructions) the logits stay close."""
from __future__ import annotations

import pytest
import torch

from tests.exact import exact_llm
from tokenmill import LLM, SamplingParams
from tokenmill.model.layers.quantized import dense_gemm_dtype
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.qlinear import available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason=f"qlinear kernel not built: {build_error('qlinear')}")]

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
             "Explain photosynthesis in one sentence.", "Count from one to ten."]


def _greedy(quantization: str) -> tuple[list[list[int]], list[list[int]], type]:
    # float32 GEMMs and K/V (tests/exact.py): packed and dequantized weights then differ by summation order only
    llm = exact_llm(max_model_len=1024, quantization=quantization, enable_prefix_caching=False, gemm_dtype="float32")
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    one = [llm.chat(m, params, use_tqdm=False)[0].outputs[0].token_ids for m in msgs[:2]]  # batch 1: M = 1 rows
    many = [o.outputs[0].token_ids for o in llm.chat(msgs, params, use_tqdm=False)]  # M = 5 rows per decode step
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0
    return one, many, type(llm.engine.core.runner.model.lm_head)


def test_auto_equals_none_greedy():
    one_q, many_q, head_q = _greedy("auto")
    one_f, many_f, head_f = _greedy("none")
    assert head_q.__name__ == "QuantizedLMHead" and head_f.__name__ == "LMHead"
    assert one_q == one_f
    assert many_q == many_f


def _prompt_logprobs(gemm_dtype: str, text: str) -> tuple[list, int]:
    llm = LLM(max_model_len=1024, enable_prefix_caching=False, gemm_dtype=gemm_dtype)
    model = llm.engine.core.runner.model
    # a dense copy, or (bf16 on AMX) the AMX path; int8: the panels (bf16 attention for long chunks)
    assert dense_gemm_dtype(model) == (torch.bfloat16 if gemm_dtype == "int8" else getattr(torch, gemm_dtype))
    prompt = llm.get_tokenizer().encode(text)[:300]  # a 300-row prefill: the dense / AMX path
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    return out.prompt_logprobs[1:], len(prompt)  # one per prompt position after the first


def test_bf16_gemm_logprobs_close_to_float32():
    text = " ".join(f"Sentence {i}: the quick brown fox jumps over the lazy dog near river {i}." for i in range(30))
    (ref, n), (bf, _) = _prompt_logprobs("float32", text), _prompt_logprobs("bfloat16", text)
    # the logprob each run gives the actual next prompt token: bf16 rounding of weights and activations moves it
    # by ~1e-2 typically (llama.cpp's int8 activations move its logits ~0.2 from transformers' float32)
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(ref, bf)]
    assert len(diffs) == n - 1
    assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.05, (max(diffs), sum(diffs) / len(diffs))
    assert sum(diffs) > 0  # really a different path
    agree = sum(a.top[0][0] == b.top[0][0] for a, b in zip(ref, bf)) / len(ref)
    assert agree > 0.95, agree


def test_int8_gemm_logprobs_close_to_float32():
    """gemm_dtype int8 (an AVX512-VNNI build): the block-quantized linears and head run int8 panels, x rounded per
    row and 64 values to 8 bits, the weights requantized per output and 64 values (csrc/qlinear_i8gemm.c). Measured
    on the Zen 4 box (bench/results/s23 i8gemm_accuracy.txt): mean |diff| 0.028, max 0.48, top-1 agreement 0.99."""
    from tokenmill.model.layers.quantized import I8_HEAD_MIN_ROWS, I8_MIN_ROWS, panel_kinds
    from tokenmill.ops.cpu.qlinear import i8gemm_available

    if not i8gemm_available():
        pytest.skip("no AVX512-VNNI int8 panels on this machine")
    text = " ".join(f"Sentence {i}: the quick brown fox jumps over the lazy dog near river {i}." for i in range(30))
    (ref, n), (q8, _) = _prompt_logprobs("float32", text), _prompt_logprobs("int8", text)
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(ref, q8)]
    assert len(diffs) == n - 1
    assert max(diffs) < 1.0 and sum(diffs) / len(diffs) < 0.06, (max(diffs), sum(diffs) / len(diffs))
    assert sum(diffs) > 0
    agree = sum(a.top[0][0] == b.top[0][0] for a, b in zip(ref, q8)) / len(ref)
    assert agree > 0.95, agree
    model = LLM(max_model_len=256, gemm_dtype="int8").engine.core.runner.model
    head = model.lm_head
    assert head.qpanels is not None and head.qpanels.i8 == 1 and head.amx_min_rows == I8_HEAD_MIN_ROWS
    lin = model.model.layers[0].mlp.down_proj
    assert lin.qpanels.i8 == 1 and lin.amx_min_rows == I8_MIN_ROWS
    assert panel_kinds(model) == {"int8": 4 * len(model.model.layers) + 1}  # what the engine core logs


def test_lm_head_takes_the_amx_path_for_decode_batches():
    """gemm_dtype bfloat16 on an AMX CPU: the packed LM head runs batches of HEAD_AMX_MIN_ROWS+ rows on the AMX path
    (bf16 rounding, like the body's linears), smaller ones on the float32 kernel; logits stay close, and with
    gemm_dtype float32 it never rounds."""
    from tokenmill.model.layers.quantized import HEAD_AMX_MIN_ROWS
    from tokenmill.ops.cpu.qlinear import amx_available

    if not amx_available():
        pytest.skip("no AMX on this CPU")
    head = LLM(max_model_len=256, gemm_dtype="bfloat16").engine.core.runner.model.lm_head
    assert head.amx_min_rows == HEAD_AMX_MIN_ROWS
    x = torch.randn(64, head.hidden_size, generator=torch.Generator().manual_seed(0))
    fast = head(x)
    head.amx_min_rows = 0
    exact = head(x)
    assert 0 < (fast - exact).abs().max().item() < 0.2  # really rounded, and only by bf16
    assert LLM(max_model_len=256, gemm_dtype="float32").engine.core.runner.model.lm_head.amx_min_rows == 0
