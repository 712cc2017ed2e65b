"""The bundled SmolLM2 Q4_1 GGUF kept packed (quantization auto, the CPU kernels) gives the same greedy tokens as
dequantized at load (quantization none), single requests and a batch of concurrent ones."""
from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.qlinear import available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason=f"qlinear kernel not built: {build_error('qlinear')}")]

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
             "Explain photosynthesis in one sentence.", "Count from one to ten."]


def _greedy(quantization: str) -> tuple[list[list[int]], list[list[int]], type]:
    llm = LLM(max_model_len=1024, quantization=quantization, enable_prefix_caching=False)
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
