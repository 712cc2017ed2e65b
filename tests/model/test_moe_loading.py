"""MoE models from every source: HF safetensors (per-expert and fused expert tensors), GGUF (llama.cpp's 3-D
ffn_*_exps, F32 and packed Q8_0 / Q4_0 experts) and dummy weights, against transformers with the same weights."""
from __future__ import annotations

import os

import pytest
import torch

from tests.model.tiny_models import MOE_ARCHS, build_tiny_model, fake_quantize_, save_tiny_gguf, tiny_config
from tokenmill.errors import ModelLoadError
from tokenmill.model.layers.moe import FusedExperts, PackedExperts, moe_blocks
from tokenmill.model.loader import ModelSource, load_hf_config, load_model, resolve_model_source
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.ops.cpu.layer import fuse_cpu_layers
from tokenmill.ops.moe.cpu import fused_moe_cpu, fused_moe_grouped
from tokenmill.worker.forward_batch import build_forward_batch

IDS = [1, 17, 300, 42, 5, 99, 410, 7, 250, 8, 61, 3, 77, 128]


def _logits(model, ids=IDS) -> torch.Tensor:
    kv = allocate_kv_cache(model.num_layers, 8, 16, model.num_kv_heads, model.head_dim, model.dtype, "cpu")
    batch = build_forward_batch([ids], [0], [[5, 2, 7]], 16, logits_for="all")
    with torch.no_grad():
        return model.compute_logits(model(batch.input_ids, batch.positions, kv, batch)[batch.logits_indices])


def _hf_logits(hf, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _gguf_model(arch: str):
    # llama.cpp's qwen2moe has every layer sparse: drop the tiny config's dense layer 0 for the GGUF file
    return build_tiny_model(arch, mlp_only_layers=[]) if arch == "qwen2_moe" else build_tiny_model(arch)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fused_expert_safetensors(arch, tmp_path):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj [E, 2I, H]) written as is."""
    from safetensors.torch import save_file

    hf = build_tiny_model(arch)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, os.path.join(tmp_path, "model.safetensors"))
    src = resolve_model_source(str(tmp_path))
    model = load_model(src, load_hf_config(src), torch.float32, "cpu")
    assert (_logits(model) - _hf_logits(hf)).abs().max().item() < 1e-4


def test_missing_expert_is_reported(tmp_path):
    from safetensors.torch import save_file

    hf = build_tiny_model("qwen3_moe")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    state = load_file(os.path.join(tmp_path, "model.safetensors"))
    del state["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(state, os.path.join(tmp_path, "model.safetensors"))
    src = resolve_model_source(str(tmp_path))
    missing = r"lacks 1 tensor\(s\): model.layers.1.mlp.experts.gate_up_proj\[\(5, 1\)\]"
    with pytest.raises(ModelLoadError, match=missing):
        load_model(src, load_hf_config(src), torch.float32, "cpu")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_dummy_weights(arch):
    config = tiny_config(arch)
    model = load_model(ModelSource("hf", "unused"), config, torch.float32, "cpu", load_format="dummy")
    logits = _logits(model)
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert moe_blocks(model)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_f32_gguf_matches_transformers(arch, tmp_path):
    hf = _gguf_model(arch)
    src = resolve_model_source(save_tiny_gguf(hf, str(tmp_path / f"{arch}.gguf")))
    config = load_hf_config(src)
    assert config.architectures == list(hf.config.architectures)
    model = load_model(src, config, torch.float32, "cpu")
    assert all(isinstance(b.experts, FusedExperts) for _, b in moe_blocks(model))
    assert (_logits(model) - _hf_logits(hf)).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch,qname", [("mixtral", "Q8_0"), ("qwen2_moe", "Q4_0"), ("qwen3_moe", "Q8_0"),
                                        ("olmoe", "Q4_1")])
def test_quantized_expert_gguf_stays_packed(arch, qname, tmp_path):
    """Experts stored quantized load as PackedExperts (no float copy) and match transformers holding the same
    dequantized weights; quantization none dequantizes them at load to the same logits."""
    import gguf

    from tokenmill.ops.cpu.qlinear import available

    qtype = getattr(gguf.GGMLQuantizationType, qname)
    hf = _gguf_model(arch)
    fake_quantize_(hf, "mlp.experts.", qtype)
    n = hf.config.num_hidden_layers
    fake_quantize_(hf, "self_attn.", qtype)  # packed attention too: the layers still must not take the dense path
    attn = [f"blk.{i}.attn_{p}.weight" for i in range(n) for p in ("q", "k", "v", "output")]
    qtypes = {name: qtype for name in attn}
    qtypes.update({f"blk.{i}.ffn_{p}_exps.weight": qtype for i in range(n) for p in ("gate", "up", "down")})
    src = resolve_model_source(save_tiny_gguf(hf, str(tmp_path / f"{arch}.gguf"), qtypes=qtypes))
    ref = _hf_logits(hf)
    packed = load_model(src, load_hf_config(src), torch.float32, "cpu", gemm_dtype="float32")  # exact linears
    blocks = moe_blocks(packed)
    if available():
        assert all(isinstance(b.experts, PackedExperts) and b.experts.qtype == qname.lower() for _, b in blocks)
        assert all(b.experts.gate_up_proj.dtype == torch.uint8 for _, b in blocks)
        assert fuse_cpu_layers(packed) == 0  # the fused C layer takes dense layers only
    assert (_logits(packed) - ref).abs().max().item() < 1e-4
    for op in (fused_moe_grouped, fused_moe_cpu):  # qlinear per expert; one C call per layer
        packed.set_moe_op(op)
        assert (_logits(packed) - ref).abs().max().item() < 1e-4
    dense = load_model(src, load_hf_config(src), torch.float32, "cpu", quantization="none")
    assert all(isinstance(b.experts, FusedExperts) for _, b in moe_blocks(dense))
    assert (_logits(dense) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("quantized", [False, True])
def test_per_expert_gguf_layout(quantized, tmp_path):
    """Older Mixtral GGUFs store blk.N.ffn_gate.E.weight, one 2-D tensor per expert (packed when quantized)."""
    import gguf

    from tokenmill.ops.cpu.qlinear import available

    hf = build_tiny_model("mixtral")
    qtypes = None
    if quantized:
        fake_quantize_(hf, "mlp.experts.", gguf.GGMLQuantizationType.Q8_0)
        qtypes = {f"blk.{i}.ffn_{p}.{e}.weight": gguf.GGMLQuantizationType.Q8_0 for i in range(2) for e in range(8)
                  for p in ("gate", "up", "down")}
    src = resolve_model_source(save_tiny_gguf(hf, str(tmp_path / "m.gguf"), qtypes=qtypes, per_expert=True))
    model = load_model(src, load_hf_config(src), torch.float32, "cpu", gemm_dtype="float32")  # exact kernels
    want = PackedExperts if quantized and available() else FusedExperts
    assert all(type(b.experts) is want for _, b in moe_blocks(model))
    model.set_moe_op(fused_moe_cpu)
    assert (_logits(model) - _hf_logits(hf)).abs().max().item() < 1e-4


def test_expert_counts_accumulate_and_reset():
    model = load_model(ModelSource("hf", "unused"), tiny_config("qwen2_moe"), torch.float32, "cpu",
                       load_format="dummy")
    assert model.expert_counts() == {1: [0, 0, 0, 0]}  # layer 0 is dense (mlp_only_layers)
    _logits(model)
    counts = model.expert_counts()
    assert list(counts) == [1] and sum(counts[1]) == len(IDS) * 2  # top-2: every token counted twice
    model.reset_expert_counts()
    assert model.expert_counts() == {1: [0, 0, 0, 0]}


def _meta_only_gguf(path: str, arch: str, gating: int | None = None) -> str:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(32)
    w.add_head_count(4)
    w.add_vocab_size(512)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(32)
    if gating is not None:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType(gating))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_moe_errors(tmp_path):
    src = resolve_model_source(_meta_only_gguf(str(tmp_path / "a.gguf"), "qwen2"))
    with pytest.raises(ModelLoadError, match="unsupported mixture-of-experts GGUF architecture 'qwen2'.*qwen3moe"):
        load_hf_config(src)
    src = resolve_model_source(_meta_only_gguf(str(tmp_path / "b.gguf"), "qwen3moe", gating=2))
    with pytest.raises(ModelLoadError, match=r"unsupported expert gating function 2 \(only softmax, 1\)"):
        load_hf_config(src)
    src = resolve_model_source(_meta_only_gguf(str(tmp_path / "c.gguf"), "qwen3moe", gating=1))
    config = load_hf_config(src)
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (4, 2, True)


def test_kquant_expert_gguf_stays_packed(tmp_path):
    """An OLMoE GGUF laid out like llama.cpp's Q4_K_M (Q4_K gate / up experts, Q6_K down experts in layer 0 and
    Q4_K in layer 1, Q4_K / Q6_K attention): every expert tensor stays packed in its own type (no float copy),
    the weights take no more bytes than the file, and the logits equal the file dequantized at load, through the
    per-expert qlinear path and the one-call C kernel."""
    import gguf

    from tests.ops.kquant_blocks import requantize_gguf
    from tokenmill.ops.cpu.qlinear import available

    G = gguf.GGMLQuantizationType
    hf = build_tiny_model("olmoe", hidden_size=256, intermediate_size=256)
    n = hf.config.num_hidden_layers
    qtypes = {f"blk.{i}.{t}.weight": G.Q4_K for i in range(n)
              for t in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps")}
    qtypes.update({f"blk.{i}.attn_v.weight": G.Q6_K for i in range(n)})
    qtypes.update({"blk.0.ffn_down_exps.weight": G.Q6_K, "blk.1.ffn_down_exps.weight": G.Q4_K,
                   "output.weight": G.Q6_K})
    f32 = save_tiny_gguf(hf, str(tmp_path / "f32.gguf"))
    path = requantize_gguf(f32, str(tmp_path / "q4_k_m.gguf"), qtypes)
    src = resolve_model_source(path)
    cfg = load_hf_config(src)
    packed = load_model(src, cfg, torch.float32, "cpu", gemm_dtype="float32")  # exact linears
    dense = load_model(src, cfg, torch.float32, "cpu", quantization="none")
    if available():
        (_, b0), (_, b1) = moe_blocks(packed)
        assert isinstance(b0.experts, PackedExperts) and isinstance(b1.experts, PackedExperts)
        assert (b0.experts.qtype, b0.experts.down_qtype) == ("q4_k", "q6_k")
        assert (b1.experts.qtype, b1.experts.down_qtype) == ("q4_k", "q4_k")
        weight_bytes = sum(p.numel() * p.element_size() for p in packed.parameters())
        assert weight_bytes <= os.path.getsize(path)
    ref = _logits(dense)
    assert (_logits(packed) - ref).abs().max().item() < 1e-3
    for op in (fused_moe_grouped, fused_moe_cpu):
        packed.set_moe_op(op)
        assert (_logits(packed) - ref).abs().max().item() < 1e-3


def test_amx_tile_plan():
    """Which bf16 tiles gemm auto makes at load: a dense model's layers and head while they fit the cap together; a
    MoE model's layers only (the head's tiles bought OLMoE no decode speed worth their 192 MiB)."""
    from tokenmill.model.layers.quantized import amx_tile_plan

    assert amx_tile_plan(60, 40, False, 100) == (True, True)
    assert amx_tile_plan(60, 41, False, 100) == (False, False)
    assert amx_tile_plan(0, 40, False, 100) == (False, True)  # nothing packed in the layers
    assert amx_tile_plan(60, 40, True, 100) == (True, False)
    assert amx_tile_plan(100, 900, True, 100) == (True, False)  # the head does not count against a MoE's cap
    assert amx_tile_plan(101, 0, True, 100) == (False, False)


def test_moe_amx_tiles_skip_the_lm_head(tmp_path):
    """gemm auto on an AMX CPU: a MoE GGUF's uniform attention linears keep their tiles made once, its q|k|v with
    a Q6_K v (mixed) and its LM head none, and `tokenmill plan` counts the bytes the engine made."""
    import gguf

    from tests.ops.kquant_blocks import requantize_gguf
    from tokenmill.model.layers.quantized import HEAD_AMX_MIN_ROWS, MixedQuantizedLinear, QuantizedLMHead
    from tokenmill.ops.cpu.qlinear import amx_available
    from tokenmill.perf.cli import amx_tiles_bytes
    from tokenmill.perf.cost_model import ModelSpec

    if not amx_available():
        pytest.skip("gemm auto makes no tiles without AMX")
    G = gguf.GGMLQuantizationType
    hf = build_tiny_model("olmoe", hidden_size=256, intermediate_size=256)
    n = hf.config.num_hidden_layers
    qtypes = {f"blk.{i}.{t}.weight": G.Q4_K for i in range(n) for t in
              ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    qtypes.update({"blk.0.attn_v.weight": G.Q6_K, "output.weight": G.Q6_K})  # layer 0: a mixed q|k|v
    path = requantize_gguf(save_tiny_gguf(hf, str(tmp_path / "f32.gguf")), str(tmp_path / "q4_k_m.gguf"), qtypes)
    src = resolve_model_source(path)
    cfg = load_hf_config(src)
    model = load_model(src, cfg, torch.float32, "cpu", gemm_dtype="auto")
    head, layers = model.lm_head, model.model.layers
    assert isinstance(head, QuantizedLMHead) and head.qpanels is None and head.amx_min_rows == HEAD_AMX_MIN_ROWS
    assert isinstance(layers[0].self_attn.qkv_proj, MixedQuantizedLinear)
    tiled = [layers[0].self_attn.o_proj] + [m for layer in layers[1:] for m in (layer.self_attn.qkv_proj,
                                                                                 layer.self_attn.o_proj)]
    assert all(m.qpanels is not None for m in tiled)
    made = sum(m.panels.numel() * m.panels.element_size() for m in model.modules() if getattr(m, "panels", None)
               is not None)
    assert made == amx_tiles_bytes(ModelSpec.from_hf_config(cfg), path, "cpu") > 0
    ref = load_model(src, cfg, torch.float32, "cpu", quantization="none")
    assert (_logits(model) - _logits(ref)).abs().max().item() < 0.1  # bf16 activations on the AMX path
