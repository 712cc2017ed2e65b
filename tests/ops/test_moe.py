"""The fused MoE op: routing, the grouped CPU path (dense and packed GGUF experts) and the Triton kernel, each
against the reference (every expert on every token) on random inputs, with edge-case routings."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from tokenmill.model.layers.moe import FusedExperts, PackedExperts
from tokenmill.ops.moe import select_experts
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.moe.cpu import fused_moe_cpu, fused_moe_grouped, moe_kernel_available
from tokenmill.ops.moe.reference import expert_mlp, fused_moe_reference

H, I = 64, 32


def _experts(num_experts: int, seed: int = 0, dtype=torch.float32) -> FusedExperts:
    g = torch.Generator().manual_seed(seed)
    ex = FusedExperts(num_experts, H, I, dtype)
    ex.gate_up_proj.data.copy_(torch.randn(num_experts, 2 * I, H, generator=g) * 0.2)
    ex.down_proj.data.copy_(torch.randn(num_experts, H, I, generator=g) * 0.2)
    return ex


def _routing(t: int, num_experts: int, top_k: int, seed: int = 1, renormalize: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g)
    logits = torch.randn(t, num_experts, generator=g)
    w, ids = select_experts(logits, top_k, renormalize)
    return x, w, ids


def _naive(x, ex, w, ids):
    """Token by token, pair by pair: the plainest statement of the op."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            out[t] += w[t, k] * expert_mlp(x[t:t + 1], ex.gate_up_proj[e], ex.down_proj[e])[0]
    return out


def test_select_experts_softmax_topk_renormalize():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    p = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2], [2, 3]]
    assert torch.allclose(w, torch.stack([p[0, [1, 2]], p[1, [2, 3]]]))
    wn, _ = select_experts(logits, 2, renormalize=True)
    assert torch.allclose(wn.sum(-1), torch.ones(2))
    assert torch.allclose(wn, w / w.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="top_k 5"):
        select_experts(logits, 5, True)


def test_reference_equals_naive():
    ex = _experts(4)
    x, w, ids = _routing(7, 4, 2)
    assert torch.allclose(fused_moe_reference(x, ex, w, ids), _naive(x, ex, w, ids), atol=1e-5)


def _cases():
    """(name, T, E, K, ids override): random; experts left without tokens; all tokens to one expert; K = E."""
    return [("random", 13, 8, 2, None), ("idle_experts", 5, 8, 2, "idle"), ("one_expert", 9, 4, 1, "one"),
            ("topk_all", 6, 4, 4, None), ("single_token", 1, 8, 2, None), ("no_tokens", 0, 4, 2, None)]


def _case(t, e, k, mode):
    x, w, ids = _routing(t, e, k)
    if mode == "idle":  # only experts 0 and 5 get tokens
        ids = torch.tensor([[0, 5], [5, 0]] * t)[:t]
    elif mode == "one":
        ids = torch.full((t, k), 3, dtype=torch.int64)
    return x, w, ids


@pytest.mark.parametrize("name,t,e,k,mode", _cases())
def test_grouped_matches_reference(name, t, e, k, mode):
    ex = _experts(e)
    x, w, ids = _case(t, e, k, mode)
    ref = fused_moe_reference(x, ex, w, ids)
    got = fused_moe_grouped(x, ex, w, ids)
    assert got.shape == (t, H)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    if mode == "idle":
        assert set(ids.unique().tolist()) == {0, 5}


def _packed(ex: FusedExperts, qtype: str) -> PackedExperts:
    import gguf
    import numpy as np

    gq = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}[qtype]
    p = PackedExperts(ex.num_experts, H, I, qtype)
    for src, dst in ((ex.gate_up_proj, p.gate_up_proj), (ex.down_proj, p.down_proj)):
        q = gguf.quants.quantize(src.detach().numpy().reshape(-1, src.shape[-1]), gq)  # [E*N, bytes]
        dst.weight_loader(dst, torch.from_numpy(np.ascontiguousarray(q)), None)
    return p


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("name,t,e,k,mode", _cases()[:4])
def test_packed_experts_match_reference_on_dequantized(qtype, name, t, e, k, mode):
    """Packed GGUF experts through the qlinear kernel, no dense copy, vs the reference on their dequantized
    weights (which differ from the float ones: the quantization is real)."""
    dense = _experts(e)
    packed = _packed(dense, qtype)
    x, w, ids = _case(t, e, k, mode)
    ref = fused_moe_reference(x, packed, w, ids)  # dequantized weights
    got = fused_moe_grouped(x, packed, w, ids)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(ref, fused_moe_reference(x, dense, w, ids), atol=1e-6)


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
@pytest.mark.parametrize("name,t,e,k,mode", _cases() + [("prefill", 70, 8, 2, None)])
def test_c_kernel_matches_reference(qtype, name, t, e, k, mode):
    """One C call per layer over packed experts (csrc/moe.c), vs the reference on the dequantized weights."""
    packed = _packed(_experts(e), qtype)
    x, w, ids = _case(t, e, k, mode)
    ref = fused_moe_reference(x, packed, w, ids)
    got = fused_moe_cpu(x, packed, w, ids)
    assert got.shape == (t, H) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def _kquant_packed(num_experts: int, qtype: str, down_qtype: str, h: int = 256, i: int = 256) -> PackedExperts:
    """Random experts of hidden h, intermediate i (multiples of 256), gate|up in qtype, down in down_qtype (each
    k-quant by the test quantizer, the others by gguf-py)."""
    import gguf
    import numpy as np

    from tests.ops.kquant_blocks import BLOCK_BYTES, quantize

    g = torch.Generator().manual_seed(3)
    p = PackedExperts(num_experts, h, i, qtype, down_qtype)
    for src, dst, qt in ((torch.randn(num_experts, 2 * i, h, generator=g) * 0.2, p.gate_up_proj, qtype),
                         (torch.randn(num_experts, h, i, generator=g) * 0.2, p.down_proj, down_qtype)):
        arr = src.numpy().reshape(-1, src.shape[-1])
        q = quantize(arr, qt) if qt in BLOCK_BYTES else gguf.quants.quantize(arr, getattr(gguf.GGMLQuantizationType,
                                                                                         qt.upper()))
        dst.weight_loader(dst, torch.from_numpy(np.ascontiguousarray(q)), None)
    return p


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
@pytest.mark.parametrize("qtype,down_qtype", [("q4_k", "q6_k"), ("q4_k", "q4_k"), ("q5_k", "q8_0"),
                                              ("q4_1", "q6_k")])
@pytest.mark.parametrize("name,t,e,k,mode", _cases() + [("prefill", 40, 8, 2, None)])
def test_mixed_block_types_match_reference(qtype, down_qtype, name, t, e, k, mode):
    """gate|up and down in different block types (llama.cpp's Q4_K_M: Q4_K gate / up, Q6_K down in some layers):
    the C kernel and the grouped path vs the reference on the dequantized weights, at hidden 256 (the k-quants'
    super-block), in the one-to-three-row decode path and the buffered one."""
    packed = _kquant_packed(e, qtype, down_qtype)
    assert (packed.qtype, packed.down_qtype) == (qtype, down_qtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(t, 256, generator=g)
    w, ids = select_experts(torch.randn(t, e, generator=g), k, True)
    if mode == "idle":
        ids = torch.tensor([[0, 5], [5, 0]] * t)[:t]
    elif mode == "one":
        ids = torch.full((t, k), 3, dtype=torch.int64)
    ref = fused_moe_reference(x, packed, w, ids)
    for op in (fused_moe_cpu, fused_moe_grouped):
        got = op(x, packed, w, ids)
        assert got.shape == (t, 256)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-3)


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
@pytest.mark.parametrize("qtype,down_qtype", [("q4_k", "q6_k"), ("q4_1", "q4_1")])
def test_amx_rows_match_reference(qtype, down_qtype):
    """With amx_min_rows (--gemm-dtype auto on an AMX CPU) an expert's runs of that many rows take the bf16 AMX
    path (without AMX, AVX512-BF16's panels dequantized per task), fewer rows the float32 one: both paths within bf16
    rounding of the reference (exact where neither is built)."""
    from tokenmill.ops.cpu.qlinear import amx_available, bf16_dot_available

    packed = _kquant_packed(8, qtype, down_qtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 256, generator=g)
    w, ids = select_experts(torch.randn(64, 8, generator=g), 2, True)
    ids[:3] = 7  # expert 7 gets at least 3 pairs; expert 0 none of the first rows
    ref = fused_moe_reference(x, packed, w, ids)
    exact = fused_moe_cpu(x, packed, w, ids)
    packed.amx_min_rows = 4
    got = fused_moe_cpu(x, packed, w, ids)
    torch.testing.assert_close(exact, ref, rtol=1e-4, atol=2e-3)
    scale = ref.abs().max().item()  # bf16 activations and weights: errors relative to the output's size
    assert (got - ref).abs().max().item() < 0.02 * scale
    if not amx_available() and not bf16_dot_available():
        assert torch.equal(got, exact)
    assert (fused_moe_grouped(x, packed, w, ids) - ref).abs().max().item() < 0.02 * scale


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
@pytest.mark.parametrize("qtype,down_qtype", [("q4_k", "q6_k"), ("q4_1", "q8_0")])
def test_amx_bf16_rows_match_bf16_rounded_reference(qtype, down_qtype):
    """Experts past the int8 paths' rows take the AMX bf16 tiles on rows rounded to bf16 once per expert (not once
    per task), written straight into the op's row buffers: within float32 sums of the reference on bf16-rounded
    activations and weights; an expert of more than 512 rows (the tiles' row chunks) and experts with no rows
    included. Without AMX, AVX512-BF16 (Zen 4): the same numerics on panels dequantized per task (moe.c's dot16
    experts), the same bound; a build with neither runs the float32 path: within bf16 rounding of that reference."""
    from tokenmill.model.layers.quantized import moe_switch_rows
    from tokenmill.ops.cpu.qlinear import amx_available, bf16_dot_available
    from tokenmill.ops.moe.cpu import MoEWorkspace
    from tokenmill.ops.moe.reference import fused_moe_reference_bf16

    packed = _kquant_packed(8, qtype, down_qtype)
    packed.amx_min_rows, packed.i8_max_rows, packed.amx_i8_min_rows = moe_switch_rows()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(600, 256, generator=g)
    w, ids = select_experts(torch.randn(600, 6, generator=g), 2, True)  # experts 6 and 7 get no rows
    ids[:, 0] = 3  # expert 3: 600 rows
    ref = fused_moe_reference_bf16(x, packed, w, ids)
    scale = ref.abs().max().item()
    for ws in (None, MoEWorkspace()):  # rows allocated per call, and in the shared scratch
        packed.workspace = ws
        got = fused_moe_cpu(x, packed, w, ids)
        err = (got - ref).abs()
        if amx_available() or bf16_dot_available():
            assert err.max().item() < 2e-3 * scale and err.mean().item() < 2e-5 * scale
        else:
            assert err.max().item() < 2e-2 * scale


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
@pytest.mark.parametrize("qtype,down_qtype", [("q4_k", "q6_k"), ("q5_k", "q4_k"), ("q6_k", "q5_k")])
@pytest.mark.parametrize("switch", [(1 << 30, 1 << 30, 1), (1 << 30, 1 << 30, 4), (1 << 30, 1 << 30, 0), None])
def test_int8_rows_match_rounded_reference(qtype, down_qtype, switch):
    """gemm auto's int8 activations for packed k-quant experts of any row count (1 to 49 here: one to four
    16-row tiles): the AMX int8 tiles (from amx_i8_min_rows rows; 0: never), the VNNI tiles, and the production
    switch (moe_switch_rows; its bf16 rows off the end) against the reference with each projection's input rounded
    per 32 values to int8 (fused_moe_reference_i8): the same sums up to float order, and an activation rounding
    that float order flips."""
    from tokenmill.model.layers.quantized import moe_switch_rows
    from tokenmill.ops.cpu.qlinear import i8_direct_available
    from tokenmill.ops.moe.reference import fused_moe_reference_i8

    if not i8_direct_available():
        pytest.skip("no AVX512-VNNI build: gemm auto keeps float32 activations")
    packed = _kquant_packed(8, qtype, down_qtype)
    g = torch.Generator().manual_seed(9)
    t = 70
    x = torch.randn(t, 256, generator=g)
    w, _ = select_experts(torch.randn(t, 8, generator=g), 2, True)
    counts = [1, 2, 3, 5, 16, 17, 47, 49]  # pairs per expert (sum 2t): one, two and four 16-row tiles
    flat = torch.repeat_interleave(torch.arange(8), torch.tensor(counts))  # [2t], sorted by expert
    ids = flat.reshape(2, t).T.contiguous()  # token i: pairs i and t + i (never the same expert twice)
    assert (ids[:, 0] != ids[:, 1]).all() and torch.bincount(ids.flatten()).tolist() == counts
    packed.amx_min_rows, packed.i8_max_rows, packed.amx_i8_min_rows = switch or moe_switch_rows()
    if switch is None:
        packed.i8_max_rows = max(counts)  # the production thresholds with every expert on int8
    ref = fused_moe_reference_i8(x, packed, w, ids)
    got = fused_moe_cpu(x, packed, w, ids)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 2e-3 * scale
    assert (got - ref).abs().mean().item() < 1e-5 * scale  # a few flipped roundings, not a different sum
    exact = fused_moe_reference(x, packed, w, ids)
    assert 0 < (got - exact).abs().max().item() < 0.03 * scale


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
@pytest.mark.parametrize("qtype,down_qtype", [("q4_k", "q6_k"), ("q5_k", "q4_k"), ("q6_k", "q5_k")])
def test_vnni_rows_of_every_count_match_rounded_reference(qtype, down_qtype):
    """The VNNI int8 tiles (csrc/qlinear_i8.c) for experts of 1 to 10 rows each: one pass over the weights for up to
    8 rows, two passes (5 + 4, 5 + 5) above; hidden 512 (two super-blocks a row), a sub-block of zeros in x. Against
    the reference with each projection's input rounded per 32 values."""
    from tokenmill.ops.cpu.qlinear import i8_direct_available
    from tokenmill.ops.moe.reference import fused_moe_reference_i8

    if not i8_direct_available():
        pytest.skip("no AVX512-VNNI build: gemm auto keeps float32 activations")
    counts = list(range(1, 11))
    packed = _kquant_packed(len(counts), qtype, down_qtype, h=512)
    g = torch.Generator().manual_seed(5)
    t = sum(counts)
    x = torch.randn(t, 512, generator=g)
    x[3, 64:96] = 0.0
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[torch.randperm(t, generator=g)]
    ids = ids.reshape(t, 1)
    w = torch.rand(t, 1, generator=g) + 0.5
    packed.amx_min_rows, packed.i8_max_rows, packed.amx_i8_min_rows = 1 << 30, 1 << 30, 0
    ref = fused_moe_reference_i8(x, packed, w, ids)
    got = fused_moe_cpu(x, packed, w, ids)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 2e-3 * scale
    assert (got - ref).abs().mean().item() < 1e-5 * scale


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
def test_workspace_gives_the_same_results():
    """The shared scratch (MoEWorkspace) holds the C op's row buffers where it is large enough; results identical
    with it, without it, and past its cap (the call allocates its own)."""
    from tokenmill.ops.moe.cpu import MoEWorkspace

    packed = _kquant_packed(8, "q4_k", "q6_k")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 256, generator=g)
    w, ids = select_experts(torch.randn(40, 8, generator=g), 2, True)
    plain, plain5 = fused_moe_cpu(x, packed, w, ids), fused_moe_cpu(x[:5], packed, w[:5], ids[:5])
    packed.workspace = MoEWorkspace()
    assert torch.equal(fused_moe_cpu(x, packed, w, ids), plain)
    assert packed.workspace.buf.numel() == 80 * (256 + 3 * 256) + 8 * 256
    assert torch.equal(fused_moe_cpu(x[:5], packed, w[:5], ids[:5]), plain5)  # a smaller call reuses it
    packed.workspace = MoEWorkspace(max_bytes=1024)  # not even one token's pairs: 1-token calls, own buffers
    got = fused_moe_cpu(x, packed, w, ids)
    assert (got - plain).abs().max() < 1e-6 * plain.abs().max() and packed.workspace.buf.numel() == 0


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
@pytest.mark.parametrize("gemm", ["float32", "auto"])
def test_calls_past_the_workspace_cap_run_in_slices_that_fit(gemm):
    """A call whose row buffers exceed the workspace's cap (a long prefill chunk) runs in slices of tokens that fit
    it, each in the shared buffer (never larger than the cap), with the results of one whole call (same values up
    to the paths the experts' per-slice row counts pick) and of the reference."""
    from tokenmill.model.layers.quantized import moe_switch_rows
    from tokenmill.ops.moe.cpu import MoEWorkspace, slice_tokens

    packed = _kquant_packed(8, "q4_k", "q6_k")
    if gemm == "auto":
        packed.amx_min_rows, packed.i8_max_rows, packed.amx_i8_min_rows = moe_switch_rows()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(61, 256, generator=g)
    w, ids = select_experts(torch.randn(61, 8, generator=g), 2, True)
    whole = fused_moe_cpu(x, packed, w, ids)  # no workspace: one call
    per_token, slack = 2 * (256 + 3 * 256), 8 * 256  # floats: 2 pairs a token; the tiles' slack
    packed.workspace = MoEWorkspace(max_bytes=4 * (7 * per_token + slack) + 100)
    assert slice_tokens(packed, 61, 2, 256) == 7 and slice_tokens(packed, 7, 2, 256) == 7
    assert slice_tokens(packed, 5, 2, 256) == 5
    got = fused_moe_cpu(x, packed, w, ids)
    assert packed.workspace.buf.numel() == 7 * per_token + slack  # the slices used the shared buffer
    scale = whole.abs().max().item()
    assert (got - whole).abs().max().item() < (1e-5 if gemm == "float32" else 2e-2) * scale
    ref = fused_moe_reference(x, packed, w, ids)
    assert (got - ref).abs().max().item() < (1e-5 if gemm == "float32" else 2e-2) * scale
    empty = fused_moe_cpu(x[:0], packed, w[:0], ids[:0])
    assert empty.shape == (0, 256)


def test_cpu_op_takes_dense_experts_to_the_grouped_path():
    ex = _experts(4)
    x, w, ids = _routing(9, 4, 2)
    assert torch.equal(fused_moe_cpu(x, ex, w, ids), fused_moe_grouped(x, ex, w, ids))


@pytest.mark.skipif(not moe_kernel_available(), reason=f"moe kernel not built: {build_error('moe')}")
def test_c_kernel_rejects_bad_expert_id():
    packed = _packed(_experts(4), "q8_0")
    x, w, ids = _routing(3, 4, 2)
    ids[1, 0] = 4
    with pytest.raises(ValueError, match="expert id out of range"):
        fused_moe_cpu(x, packed, w, ids)


# ---- Triton (in the interpreter without CUDA) ---------------------------------------------------------------

def _triton_module():
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    mod = importlib.import_module("tokenmill.ops.moe.triton_moe")
    if os.environ.get("TRITON_INTERPRET") == "1" and type(mod._moe_gemm_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod


@pytest.mark.parametrize("t,e,k", [(13, 8, 2), (40, 4, 4), (3, 8, 1)])
def test_align_block_size(t, e, k):
    mod = _triton_module()
    _, _, ids = _routing(t, e, k)
    sorted_ids, block_expert = mod.align_block_size(ids, e, block_m=4)
    n = t * k
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    flat = ids.reshape(-1)
    for b, ex in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * 4:(b + 1) * 4]
        rows = rows[rows < n]
        if ex < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows.long()] == ex).all()


@pytest.mark.kernel
@pytest.mark.parametrize("name,t,e,k,mode", _cases())
def test_triton_matches_reference(name, t, e, k, mode):
    mod = _triton_module()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ex = _experts(e).to(dev)
    x, w, ids = (a.to(dev) for a in _case(t, e, k, mode))
    ref = fused_moe_reference(x, ex, w, ids)
    got = mod.fused_moe_triton(x, ex, w, ids)
    assert got.shape == (t, H)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
