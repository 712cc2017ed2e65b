"""The fused CPU MoE decoder layer (tokenmill/ops/cpu/moe_layer.py, csrc/moe_layer.c) against the per-op path it
replaces (its reference: PyTorch rotary / routing around the same C kernels), on tiny OLMoE (full q/k norm, clip_qkv,
no renormalization) and Qwen3-MoE (per-head q/k norm, renormalized top-k) GGUFs with packed experts: hidden states
of a batch of decodes and a short prefill chunk over a random cached context within float tolerance, the K/V written
identically, the same expert counts, float32 and bfloat16 KV caches; a Q4_K_M-like OLMoE (mixed Q4_K / Q6_K q|k|v)
exactly and under gemm auto; and the per-op path for the steps the call does not take."""
from __future__ import annotations

import pytest
import torch

from tests.model.tiny_models import build_tiny_model, save_tiny_gguf
from tests.ops.kquant_blocks import requantize_gguf
from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source
from tokenmill.ops.attention.backend import CpuAttentionBackend
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.moe_layer import FusedMoELayer, _lib, fuse_moe_layers, moe_layer_qualifies, unfuse_moe_layers
from tokenmill.ops.moe.cpu import fused_moe_cpu, fused_moe_grouped
from tokenmill.worker.forward_batch import build_forward_batch

pytestmark = pytest.mark.skipif(_lib() is None, reason=f"moe_layer kernel not built: {build_error('moe_layer')}")


def _gguf(tmp_path, arch: str, kquant: bool) -> str:
    import gguf

    G = gguf.GGMLQuantizationType
    if kquant:  # llama.cpp Q4_K_M's layout: Q4_K q / k / o / experts, a Q6_K v (mixed q|k|v) and Q6_K down in layer 0
        hf = build_tiny_model(arch, hidden_size=256, intermediate_size=256)
        n = hf.config.num_hidden_layers
        qtypes = {f"blk.{i}.{t}.weight": G.Q4_K for i in range(n)
                  for t in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
        qtypes.update({f"blk.{i}.attn_v.weight": G.Q6_K for i in range(n)})
        qtypes["blk.0.ffn_down_exps.weight"] = G.Q6_K
    else:
        hf = build_tiny_model(arch)
        n = hf.config.num_hidden_layers
        qtypes = {f"blk.{i}.{t}.weight": G.Q8_0 for i in range(n) for t in
                  ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    f32 = save_tiny_gguf(hf, str(tmp_path / "f32.gguf"))
    return requantize_gguf(f32, str(tmp_path / "q.gguf"), qtypes)


def _model(path: str, gemm_dtype: str):
    src = resolve_model_source(path)
    model = load_model(src, load_hf_config(src), torch.float32, "cpu", gemm_dtype=gemm_dtype)
    model.set_attention_backend(CpuAttentionBackend())
    model.set_moe_op(fused_moe_cpu)
    return model


def _forward(model, fused: bool, kv_dtype: torch.dtype, chunk: int = 5):
    """Two decodes over cached contexts and one prefill chunk, on fresh caches holding the same random context;
    returns (hidden states, caches, expert counts per layer)."""
    if fused:
        assert fuse_moe_layers(model) == model.num_layers
    else:
        unfuse_moe_layers(model)
    model.reset_expert_counts()
    torch.manual_seed(0)
    hkv, d, bs = model.num_kv_heads, model.head_dim, 16
    caches = [torch.randn(2, 12, bs, hkv, d).to(kv_dtype) for _ in range(model.num_layers)]
    batch = build_forward_batch([[11], [12], list(range(13, 13 + chunk))], [20, 33, 3],
                                [[0, 1], [2, 3, 4], list(range(5, 5 + (3 + chunk + bs - 1) // bs))], bs)
    with torch.inference_mode():
        h = model(batch.input_ids, batch.positions, caches, batch)
    return h, caches, model.expert_counts()


def _taken(monkeypatch) -> list:
    taken = []
    real = FusedMoELayer.__call__
    monkeypatch.setattr(FusedMoELayer, "__call__", lambda self, *a: taken.append(real(self, *a)) or taken[-1])
    return taken


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe"])
def test_fused_equals_per_op(arch, kv_dtype, tmp_path, monkeypatch):
    model = _model(_gguf(tmp_path, arch, kquant=False), "float32")  # exact kernels on both paths
    assert all(moe_layer_qualifies(layer) for layer in model.model.layers)
    ref, ref_caches, ref_counts = _forward(model, False, kv_dtype)
    taken = _taken(monkeypatch)
    out, caches, counts = _forward(model, True, kv_dtype)
    assert len(taken) == model.num_layers and all(t is not None for t in taken)
    assert counts == ref_counts and sum(ref_counts[0]) == 7 * model.model.layers[0].mlp.top_k
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    _caches_close(caches, ref_caches)


def _caches_close(caches, ref_caches) -> None:
    """The K/V written agree to float rounding (rotary's products fused or not), one bf16 step where stored in it."""
    for a, b in zip(caches, ref_caches):
        tol = 1e-5 if a.dtype == torch.float32 else 2 ** -7
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("gemm_dtype", ["float32", "auto"])
def test_kquant_mixed_qkv_fused_equals_per_op(gemm_dtype, tmp_path, monkeypatch):
    """Q4_K_M-like: a mixed Q4_K / Q6_K q|k|v (the C layer passes its row groups), Q6_K and Q4_K down experts; under
    gemm auto both paths run the same approximate kernels (AMX / int8), so they still agree."""
    from tokenmill.model.layers.quantized import MixedQuantizedLinear

    model = _model(_gguf(tmp_path, "olmoe", kquant=True), gemm_dtype)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, MixedQuantizedLinear)
    ref, ref_caches, ref_counts = _forward(model, False, torch.float32)
    taken = _taken(monkeypatch)
    out, caches, counts = _forward(model, True, torch.float32)
    assert all(t is not None for t in taken) and len(taken) == model.num_layers
    assert counts == ref_counts
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    _caches_close(caches, ref_caches)


def test_declines_what_it_cannot_take(tmp_path, monkeypatch):
    """A long prefill chunk (SDPA on the per-op path), a swapped MoE op (expert offload) and a layer with a shared
    expert or grouped routing all run the per-op path, with the same results."""
    model = _model(_gguf(tmp_path, "olmoe", kquant=False), "float32")
    ref = _forward(model, False, torch.float32, chunk=70)[0]
    taken = _taken(monkeypatch)
    out = _forward(model, True, torch.float32, chunk=70)[0]
    assert taken and all(t is None for t in taken)
    assert torch.equal(out, ref)
    taken.clear()
    model.set_moe_op(fused_moe_grouped)
    fuse_moe_layers(model)
    _forward(model, True, torch.float32)
    assert taken and all(t is None for t in taken)
    model.set_moe_op(fused_moe_cpu)
    layer = model.model.layers[0]
    layer.mlp.shared_expert = torch.nn.Identity()
    assert not moe_layer_qualifies(layer)
    layer.mlp.shared_expert = None
    assert moe_layer_qualifies(layer)
