"""bf16 linears on a oneDNN-prepacked weight (tokenmill/ops/cpu/dense.py): the same numbers as F.linear, and a
bf16 checkpoint served with them gives the same greedy tokens as without."""
from __future__ import annotations

import pytest
import torch

from tokenmill.model.layers.linear import Linear, MergedLinear
from tokenmill.ops.cpu.dense import prepack_available, prepack_bf16_linears, unprepack

pytestmark = pytest.mark.skipif(not prepack_available(), reason="no oneDNN bf16 matmul on this CPU")


@pytest.mark.parametrize("rows", [1, 5, 16, 64, 300])
def test_prepacked_equals_f_linear(rows):
    torch.manual_seed(rows)
    model = torch.nn.ModuleList([Linear(96, 160, bias=True, dtype=torch.bfloat16),
                                 MergedLinear(96, [64, 32], dtype=torch.bfloat16),
                                 Linear(96, 40, dtype=torch.float32)])  # float32: left alone
    for m in model:
        m.weight.data.normal_()
        if m.bias is not None:
            m.bias.data.normal_()
    x = torch.randn(rows, 96)
    want = [m(x.to(m.weight.dtype)) for m in model]
    assert prepack_bf16_linears(model) == 2 and model[2].fast_path is None
    got = [m(x.to(m.weight.dtype)) for m in model]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)  # bf16 outputs; oneDNN's own kernels either way
    assert prepack_bf16_linears(model, max_bytes=0) == 0  # over the memory cap: nothing (already installed: 0)
    unprepack(model)
    assert prepack_bf16_linears(model, max_bytes=1000) == 0 and all(m.fast_path is None for m in model)


def test_bf16_checkpoint_greedy_same_with_and_without(tmp_path, gguf_tokenizer_path):
    """The per-op bfloat16 model (quantization none; the default on an AMX CPU packs the weights instead:
    tests/engine/test_packed_16bit.py): its prepacked linears give the same greedy tokens as plain torch."""
    from transformers import AutoModelForCausalLM

    from tests.model.tiny_models import tiny_config
    from tokenmill import LLM, SamplingParams

    cfg = tiny_config("llama")
    cfg.vocab_size = 49152
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(tmp_path))
    llm = LLM(model=str(tmp_path), tokenizer=gguf_tokenizer_path, dtype="bfloat16", max_model_len=256,
              quantization="none", num_kv_blocks=64)
    model = llm.engine.core.runner.model
    assert model.model.layers[0].mlp.down_proj.fast_path is not None  # installed by the CPU device setup
    prompts = [[1, 504, 3, 88, 900], [4, 5, 6, 7], list(range(10, 60))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    fast = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    unprepack(model)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert fast == plain
