"""LoRA inside the fused C decoder layer (csrc/lora.c) against the per-op path with the reference-tested grouped
op, on the bundled SmolLM2 Q4_1 GGUF: hidden states of a mixed batch (base rows and two adapters, decodes and a
prefill chunk) within float tolerance, greedy tokens identical, and no step leaving the fused layer."""
from __future__ import annotations

import pytest
import torch

from tests.lora.adapters import write_random_adapter
from tokenmill import LLM, LoRARequest, SamplingParams
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.layer import FusedCpuLayer, _lib, fuse_cpu_layers, unfuse_cpu_layers
from tokenmill.worker.forward_batch import build_forward_batch

pytestmark = [pytest.mark.skipif(_lib() is None, reason=f"layer kernel not built: {build_error('layer')}"),
              pytest.mark.slow]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    llm = LLM(max_model_len=512, enable_prefix_caching=False, num_kv_blocks=64, gemm_dtype="float32",
              enable_lora=True, max_loras=3, max_lora_rank=16)  # K = 16 x slices: the AVX-512 path
    shapes = llm.engine.lora_shapes
    loras = []
    for i, (rank, targets) in enumerate([(16, ALL), (4, ["q_proj", "v_proj", "up_proj"])]):
        path = str(tmp_path_factory.mktemp(f"smol_lora{i}"))
        write_random_adapter(path, shapes, rank, targets, seed=i)
        lr = LoRARequest(f"s{i}", i + 1, path)
        llm.add_lora(lr)
        loras.append(lr)
    return llm, loras


def _forward(llm, fused: bool, lora_ids):
    runner = llm.engine.core.runner
    model = runner.model
    (fuse_cpu_layers if fused else unfuse_cpu_layers)(model)
    torch.manual_seed(0)
    cfg = model.config
    hkv, d, bs = model.num_kv_heads, model.head_dim, 16
    caches = [torch.randn(2, 12, bs, hkv, d) for _ in range(cfg.num_hidden_layers)]
    # ordered by adapter as the runner orders them: base decode, adapter 1 decode + chunk, adapter 2 decode
    batch = build_forward_batch([[11], [12], [13, 14, 15, 16, 17], [18]], [20, 33, 3, 7],
                                [[0, 1], [2, 3, 4], [5], [6]], bs)
    with torch.inference_mode():
        runner.lora.begin_step(lora_ids, batch.query_lens_cpu)
        try:
            h = model(batch.input_ids, batch.positions, caches, batch)
        finally:
            runner.lora.end_step()
    return h


def test_fused_lora_equals_per_op(setup, monkeypatch):
    llm, loras = setup
    # the adapters are resident once a step has carried their loads
    llm.generate([1, 2, 3], SamplingParams(max_tokens=1), use_tqdm=False, lora_request=loras[0])
    llm.generate([1, 2, 3], SamplingParams(max_tokens=1), use_tqdm=False, lora_request=loras[1])
    ids = [0, 1, 1, 2]
    ref = _forward(llm, False, ids)
    base = _forward(llm, False, [0, 0, 0, 0])
    assert (ref - base)[1:].abs().max() > 1e-2  # the adapters change the rows they touch
    torch.testing.assert_close(ref[0], base[0])
    taken = []
    real_call = FusedCpuLayer.__call__
    monkeypatch.setattr(FusedCpuLayer, "__call__", lambda self, *a: taken.append(real_call(self, *a)) or taken[-1])
    out = _forward(llm, True, ids)
    assert taken and all(x is not None for x in taken)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_greedy_fused_vs_per_op(setup):
    llm, loras = setup
    prompts = [[1, 504, 3, 88, 900], [4, 5, 6], [77, 78, 79, 80, 81, 82, 83]] * 3
    lr = [None] * 3 + [loras[0]] * 3 + [loras[1]] * 3
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    model = llm.engine.core.runner.model
    rt = llm.engine.core.runner.lora
    fuse_cpu_layers(model)
    before = rt.unfused_steps
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lr)]
    assert rt.unfused_steps == before  # every LoRA step ran inside the fused layer
    unfuse_cpu_layers(model)
    per_op = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lr)]
    fuse_cpu_layers(model)
    assert fused == per_op
    assert fused[0] != fused[3] and fused[3] != fused[6]
