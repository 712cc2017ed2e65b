"""Packed GGUF-block matmul (Q4_0 / Q4_1 / Q8_0): the torch reference dequantizer vs the gguf package, the C
kernel vs dequantize-then-matmul over M, N not a multiple of the tile, bias; row lookups; the quantized layers
and a tiny quantized GGUF loaded packed (quantization auto) vs dequantized (none)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.ops.cpu import qlinear as QL
from tokenmill.ops.cpu.build import build_error

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

TYPES = {"q4_0": G.Q4_0, "q4_1": G.Q4_1, "q8_0": G.Q8_0, "bf16": G.BF16, "f16": G.F16}  # bf16 / f16: weights as they are
needs_kernel = pytest.mark.skipif(not QL.available(), reason=f"qlinear kernel not built: {build_error('qlinear')}")


def _packed(qtype: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, row_bytes], gguf's own float32 dequantization [n, k]) of random weights."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    q = gguf_quantize(w, TYPES[qtype])
    ref = gguf_dequantize(q, TYPES[qtype]).reshape(n, k).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).reshape(n, -1), torch.from_numpy(ref.copy())


@pytest.mark.parametrize("qtype", list(TYPES))
def test_reference_dequantize_equals_gguf(qtype):
    packed, ref = _packed(qtype, 7, 96)
    assert packed.shape == (7, QL.row_bytes(qtype, 96))
    assert torch.equal(QL.dequantize(packed, qtype, 96), ref)


@needs_kernel
@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("m", [1, 2, 5, 16, 64, 67])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_dequantized_matmul(qtype, m, bias):
    n, k = 45, 160  # n: not a multiple of the 4-column tile; m = 67: past one 64-row chunk, odd remainder
    packed, w = _packed(qtype, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = QL.qlinear(x, packed, qtype, b)
    ref = (x.double() @ w.double().T + (b.double() if bias else 0)).float()
    assert got.shape == (m, n) and got.dtype == torch.float32
    scale = (x.abs().double() @ w.abs().double().T).max().item()  # error bound relative to the sum of |terms|
    assert (got - ref).abs().max().item() <= 1e-5 * scale


@pytest.mark.skipif(not QL.amx_available(), reason="no AMX (bf16 tiles) on this CPU, or the kernel was built without it")
@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("m", [4, 17, 33, 530])  # one partial token tile; 2 x 2 tiles with tails; past a 512-row pass
@pytest.mark.parametrize("bias", [False, True])
def test_amx_path_matches_bf16_rounded_matmul(qtype, m, bias):
    """The AMX path rounds weights and activations to bf16 and sums in float32: compare with exactly that."""
    n, k = 45, 160  # n: one full 16-output panel, one partial, one empty in the second panel pair
    packed, w = _packed(qtype, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = QL.qlinear(x, packed, qtype, b, amx_min_rows=4)
    ref = (x.bfloat16().double() @ w.bfloat16().double().T + (b.double() if bias else 0)).float()
    assert got.shape == (m, n) and got.dtype == torch.float32
    scale = (x.abs().double() @ w.abs().double().T).max().item()
    assert (got - ref).abs().max().item() <= 1e-5 * scale
    exact = QL.qlinear(x, packed, qtype, b)  # below the threshold / without it: the float32 kernel
    assert not torch.equal(got, exact)
    torch.testing.assert_close(QL.qlinear(x[:3], packed, qtype, b, amx_min_rows=4), exact[:3], rtol=1e-5, atol=1e-4)
    # the tiles made once (QuantizedLinear.pack_amx) are the ones each call would make: the same numbers
    panels, st = QL.amx_pack(packed, qtype, k)
    assert panels.numel() * 4 == QL.amx_panel_bytes(k, n)
    assert torch.equal(QL.qlinear(x, packed, qtype, b, amx_min_rows=4, qpanels=st), got)
    assert torch.equal(QL.qlinear(x[:3], packed, qtype, b, amx_min_rows=4, qpanels=st),
                       QL.qlinear(x[:3], packed, qtype, b, amx_min_rows=4))  # below the AMX rows: the packed rows


@needs_kernel
def test_kernel_strided_input_and_leading_dims():
    packed, w = _packed("q4_1", 9, 64)
    x = torch.randn(2, 3, 128)[..., ::2]  # non-contiguous
    got = QL.qlinear(x, packed, "q4_1")
    assert got.shape == (2, 3, 9)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)
    assert QL.qlinear(torch.empty(0, 64), packed, "q4_1").shape == (0, 9)


@pytest.mark.parametrize("qtype", list(TYPES))
def test_dequantize_rows(qtype):
    packed, w = _packed(qtype, 20, 64)
    ids = torch.tensor([[3, 0], [19, 3]])
    assert torch.equal(QL.dequantize_rows(packed, qtype, 64, ids), w[ids])


@needs_kernel
def test_bad_arguments():
    packed, _ = _packed("q8_0", 4, 64)
    with pytest.raises(IndexError):
        QL.dequantize_rows(packed, "q8_0", 64, torch.tensor([4]))
    with pytest.raises(ValueError, match="bytes per row"):
        QL.qlinear(torch.randn(1, 96), packed, "q8_0")
    with pytest.raises(ValueError, match="multiple"):
        QL.row_bytes("q4_0", 48)


def test_quantized_linear_merged_shards_and_loader_errors():
    from tokenmill.model.layers.quantized import QuantizedLinear

    (pa, wa), (pb, wb) = _packed("q4_1", 6, 64, 1), _packed("q4_1", 10, 64, 2)
    lin = QuantizedLinear(64, [6, 10], "q4_1", bias=True, shard_names=[0, 1])
    lin.weight_loader(lin.weight, pb, 1)
    lin.weight_loader(lin.weight, pa, 0)
    lin.weight_loader(lin.bias, torch.ones(10), 1)
    lin.weight_loader(lin.bias, torch.zeros(6), 0)
    x = torch.randn(3, 64)
    ref = x @ torch.cat([wa, wb]).T + torch.cat([torch.zeros(6), torch.ones(10)])
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        lin.weight_loader(lin.weight, wa, 0)
    with pytest.raises(ValueError, match="shape"):
        lin.weight_loader(lin.weight, pb, 0)
    with pytest.raises(ValueError, match="shard"):
        lin.weight_loader(lin.weight, pa, 2)
    lin.dense_min_rows = 2  # the float32 copy serves calls with >= 2 rows, the kernel the rest: same result
    lin.finalize()
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x[:1]), ref[:1], rtol=1e-5, atol=1e-5)
    lin.finalize(torch.bfloat16)  # bf16 copy (AMX / AVX512-BF16 GEMM): bf16 rounding, float32 out, bias kept
    assert lin.weight_dense.dtype == torch.bfloat16
    y = lin(x)
    assert y.dtype == torch.float32 and not torch.equal(y, ref)  # really the bf16 path
    torch.testing.assert_close(y, ref, rtol=0.02, atol=0.05)
    torch.testing.assert_close(lin(x[:1]), ref[:1], rtol=1e-5, atol=1e-5)  # 1 row: the exact packed kernel


def test_resolve_gemm_dtype():
    from tokenmill.model.layers.quantized import cpu_has_bf16_matmul, resolve_gemm_dtype

    assert resolve_gemm_dtype("float32") == torch.float32
    assert resolve_gemm_dtype("bfloat16") == torch.bfloat16
    assert resolve_gemm_dtype("auto") == (torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32)
    with pytest.raises(ValueError, match="gemm_dtype"):
        resolve_gemm_dtype("int4")


# GGUF tensor name -> type; blk.1.attn_k is Q8_0 while attn_q/attn_v are Q4_1, so layer 1's qkv stays float
_TINY_QTYPES = {
    "token_embd.weight": G.Q8_0,
    **{f"blk.{i}.{t}.weight": G.Q4_1 for i in range(2) for t in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")},
    **{f"blk.{i}.{t}.weight": G.Q4_0 for i in range(2) for t in ("attn_output", "ffn_down")},
    "blk.1.attn_k.weight": G.Q8_0,
}


@pytest.mark.parametrize("name", ["smollm", "llama"])  # tied (Q8_0 embedding = LM head) and untied (float head)
def test_tiny_quantized_gguf_auto_equals_none(name, tmp_path):
    from tests.model.tiny_models import build_tiny_model, save_tiny_gguf
    from tokenmill.model.layers.linear import Linear
    from tokenmill.model.layers.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedLMHead
    from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source

    path = save_tiny_gguf(build_tiny_model(name), str(tmp_path / "q.gguf"), qtypes=_TINY_QTYPES)
    src = resolve_model_source(path)
    cfg = load_hf_config(src)
    none = load_model(src, cfg, torch.float32, "cpu", quantization="none")
    auto = load_model(src, cfg, torch.float32, "cpu", quantization="auto", gemm_dtype="float32")  # exact kernels
    assert isinstance(none.model.layers[0].self_attn.qkv_proj, Linear)
    if QL.available():
        layer0, layer1 = auto.model.layers[0], auto.model.layers[1]
        assert isinstance(layer0.self_attn.qkv_proj, QuantizedLinear) and layer0.self_attn.qkv_proj.qtype == "q4_1"
        assert isinstance(layer0.mlp.down_proj, QuantizedLinear) and layer0.mlp.down_proj.qtype == "q4_0"
        assert type(layer1.self_attn.qkv_proj) is not QuantizedLinear  # mixed shard types stay float
        assert isinstance(auto.model.embed_tokens, QuantizedEmbedding)
        assert isinstance(auto.lm_head, QuantizedLMHead) == (name == "smollm")
    ids = torch.tensor([1, 17, 300, 5, 42, 9, 400, 3])
    outs: list[list[torch.Tensor]] = []
    for model in (none, auto):
        out = outs.append([]) or outs[-1]
        with torch.no_grad():
            h = model.model.embed_tokens(ids)
            for layer in model.model.layers:  # attention-free check of every projection: run the sublayers
                qkv = layer.self_attn.qkv_proj(h)
                h = h + layer.self_attn.o_proj(qkv[:, : layer.self_attn.q_size])
                h = h + layer.mlp(h)
                out.append(qkv)
            out.append(model.compute_logits(h))
    for got, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    if QL.amx_available():  # gemm auto (bf16) on an AMX CPU: the small model's tiles are made once at load
        bf16 = load_model(src, cfg, torch.float32, "cpu", quantization="auto", gemm_dtype="auto")
        linears = [m for m in bf16.modules() if type(m) is QuantizedLinear]
        assert linears and all(m.qpanels is not None and m.amx_min_rows for m in linears)
        x = torch.randn(7, linears[0].in_features)
        ref = QL.qlinear(x, linears[0].weight, linears[0].qtype, linears[0].bias, amx_min_rows=4)
        assert torch.equal(linears[0](x), ref)  # the tiles made once are the tiles each call would make


@pytest.mark.skipif(not QL.amx_available(), reason="no AMX (bf16 tiles) on this CPU, or the kernel was built without it")
@pytest.mark.parametrize("qtype", ["q4_1", "bf16"])
@pytest.mark.parametrize("m", [4, 17, 530])
def test_glu_panels_same_outputs_and_fused_silu(qtype, m):
    """gate|up panels paired for the GLU epilogue: the linear's outputs are bit-identical to the plain panels', and
    the one-pass silu(gate) * up equals silu of those outputs (the fused layer's silu_mul_rows: the same values)."""
    i, k = 48, 160
    packed, w = _packed(qtype, 2 * i, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=g), torch.randn(2 * i, generator=g)
    keep_plain, plain = QL.amx_pack(packed, qtype, k)  # (the structs point into the panel tensors: kept alive)
    keep_paired, paired = QL.amx_pack(packed, qtype, k, glu=i)
    for bias in (None, b):
        ref = QL.qlinear(x, packed, qtype, bias, amx_min_rows=4, qpanels=plain)
        assert torch.equal(QL.qlinear(x, packed, qtype, bias, amx_min_rows=4, qpanels=paired), ref)
        act = QL.glu_linear(x, paired, bias, amx_min_rows=4)
        torch.testing.assert_close(act, torch.nn.functional.silu(ref[:, :i]) * ref[:, i:], rtol=1e-6, atol=1e-6)
    assert QL.glu_linear(x[:3], paired, amx_min_rows=4) is None  # below the AMX rows: the caller's own path
    assert QL.glu_linear(x, plain, amx_min_rows=4) is None  # plain panels: no epilogue
    with pytest.raises(ValueError):
        QL.amx_pack(packed[:40], qtype, k, glu=20)  # not gate|up of a multiple of 16
