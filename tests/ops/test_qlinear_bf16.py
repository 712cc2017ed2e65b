"""The AVX512-BF16 path of a 16-bit or block-quantized weight (csrc/qlinear_bf16.c: the AMX panels' layout run with vdpbf16ps on a CPU
without the tile unit) against its pure-PyTorch reference, x rounded to bf16 times the bf16 weights summed in
float32: odd N, K a few blocks, rows 1..70 (every row-block size of the micro-kernel, tails past a chunk), bias,
bf16 and f16 weights, the gate|up panels (both outputs and the silu(gate) * up epilogue); and which machines pack
the panels (the loader's and finalize's rules)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenmill.model.layers.quantized as Q  # (imported before any test patches QL: it binds QL's functions)
from tokenmill.ops.cpu import qlinear as QL

needs_dot = pytest.mark.skipif(not (QL.available() and QL.bf16_dot_available() and not QL.amx_available()),
                               reason="no AVX512-BF16 path here (not built with it, or AMX takes the panels)")


def _weight(qtype: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, 2k], the weight as the kernel uses it: bf16 values as float32)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.5).to(
        torch.bfloat16 if qtype == "bf16" else torch.float16)
    return w.contiguous().view(torch.uint8).reshape(n, 2 * k), w.float().to(torch.bfloat16).float()


def _reference(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    y = x.to(torch.bfloat16).double() @ w.double().T
    return (y + bias.double() if bias is not None else y).float()


@needs_dot
@pytest.mark.parametrize("qtype", ["bf16", "f16"])
@pytest.mark.parametrize("n,k", [(33, 64), (47, 96), (100, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_bf16_rounded_matmul(qtype, n, k, bias):
    packed, w = _weight(qtype, n, k, seed=n + k)
    panels, st = QL.amx_pack(packed, qtype, k)
    assert panels.numel() * 4 == QL.amx_panel_bytes(k, n)
    g = torch.Generator().manual_seed(k)
    b = torch.randn(n, generator=g) if bias else None
    for m in list(range(1, 26)) + [35, 36, 37, 48, 63, 64, 70]:
        x = torch.randn(m, k, generator=g)
        got = QL.qlinear(x, packed, qtype, b, amx_min_rows=1, qpanels=st)
        ref = _reference(x, w, b)
        scale = (x.abs().double() @ w.abs().double().T).max().item()
        assert got.shape == (m, n)
        assert (got - ref).abs().max().item() <= 1e-5 * scale, (m, (got - ref).abs().max().item())


@needs_dot
def test_long_call_spans_row_chunks():
    """2000 rows at K = 1536: several chunks of rows (x kept L2-sized), the last one partial."""
    packed, w = _weight("bf16", 40, 1536, seed=3)
    _, st = QL.amx_pack(packed, "bf16", 1536)
    x = torch.randn(2000, 1536, generator=torch.Generator().manual_seed(4))
    got = QL.qlinear(x, packed, "bf16", amx_min_rows=4, qpanels=st)
    scale = (x.abs().double() @ w.abs().double().T).max().item()
    assert (got - _reference(x, w, None)).abs().max().item() <= 1e-5 * scale


@needs_dot
def test_rows_below_the_switch_stay_exact():
    """Fewer rows than amx_min_rows: the float32 packed kernel (x not rounded), as before."""
    packed, w = _weight("bf16", 33, 64, seed=5)
    _, st = QL.amx_pack(packed, "bf16", 64)
    x = torch.randn(3, 64)
    got = QL.qlinear(x, packed, "bf16", amx_min_rows=4, qpanels=st)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)


@needs_dot
@pytest.mark.parametrize("m", [1, 5, 13, 64])
def test_gate_up_panels_and_glu_epilogue(m):
    i, k = 48, 96
    packed, w = _weight("bf16", 2 * i, k, seed=m)
    b = torch.randn(2 * i)
    _, st = QL.amx_pack(packed, "bf16", k, glu=i)
    x = torch.randn(m, k)
    ref = _reference(x, w, b)
    scale = (x.abs().double() @ w.abs().double().T).max().item()
    gu = QL.qlinear(x, packed, "bf16", b, amx_min_rows=1, qpanels=st)  # [gate | up] columns as usual
    assert (gu - ref).abs().max().item() <= 1e-5 * scale
    act = QL.glu_linear(x, st, b, amx_min_rows=1)
    torch.testing.assert_close(act, F.silu(ref[:, :i]) * ref[:, i:], rtol=1e-4, atol=1e-4 * scale)


@needs_dot
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("m", [4, 17, 64, 70])
def test_block_types_panels_match_bf16_rounded_matmul(qtype, m):
    """A GGUF block type's panels (its blocks dequantized as gguf does, rounded to bf16 once at load) run the same
    kernel: x and the dequantized weights rounded to bf16, float32 sums; fewer rows than the switch keep the exact
    packed kernel; the gate|up panels' epilogue too."""
    from tests.ops.test_qlinear import _packed

    n, k = 45, 160
    packed, w = _packed(qtype, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    keep, st = QL.amx_pack(packed, qtype, k)
    got = QL.qlinear(x, packed, qtype, b, amx_min_rows=4, qpanels=st)
    ref = _reference(x, w.bfloat16().float(), b)
    scale = (x.abs().double() @ w.abs().double().T).max().item()
    assert (got - ref).abs().max().item() <= 1e-5 * scale
    exact = QL.qlinear(x[:3], packed, qtype, b)
    assert torch.equal(QL.qlinear(x[:3], packed, qtype, b, amx_min_rows=4, qpanels=st), exact)
    i = 32
    gu, wg = _packed(qtype, 2 * i, k, seed=m + 1)
    keep_glu, paired = QL.amx_pack(gu, qtype, k, glu=i)
    ref = _reference(x, wg.bfloat16().float(), None)
    act = QL.glu_linear(x, paired, None, amx_min_rows=4)
    torch.testing.assert_close(act, F.silu(ref[:, :i]) * ref[:, i:], rtol=1e-4, atol=1e-4 * scale)


@needs_dot
@pytest.mark.parametrize("qtype,n,k", [("q4_k", 45, 512), ("q6_k", 32, 256), ("q8_0", 17, 96), ("bf16", 33, 64)])
def test_packer_words_are_the_bf16_rounded_weights_in_panel_order(qtype, n, k):
    """tm_qlinear_bf16_pack (16 rows dequantized, then converted and transposed in registers): bit for bit the
    weights as dequantized, rounded to bf16 (nearest even), in the panels' order: panels of 16 output rows
    ([K/2 k-pairs][16 outputs] 32-bit words, k = 2p in the low half), rows past N zero, two panels per 32 rows."""
    from tests.ops.test_qlinear import _packed

    if qtype == "bf16":
        packed, _ = _weight(qtype, n, k, seed=n)
        w = packed.view(torch.bfloat16).float()
    elif qtype in ("q4_k", "q6_k"):
        import numpy as np

        from tests.ops.kquant_blocks import quantize

        rng = np.random.default_rng(n)
        arr = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
        packed = torch.from_numpy(np.ascontiguousarray(quantize(arr, qtype))).view(torch.uint8).reshape(n, -1)
        w = QL.dequantize_rows(packed, qtype, k, torch.arange(n))
    else:
        packed, _ = _packed(qtype, n, k, seed=n)
        w = QL.dequantize_rows(packed, qtype, k, torch.arange(n))  # the C dequantizer the packer runs
    panels, _ = QL.amx_pack(packed, qtype, k)
    npad = (n + 31) // 32 * 32
    bits = torch.zeros(npad, k, dtype=torch.int32)
    bits[:n] = w.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    pairs = bits.reshape(npad // 16, 16, k // 2, 2)
    words = (pairs[..., 0] | (pairs[..., 1] << 16)).permute(0, 2, 1).contiguous()  # [panel, k-pair, 16 outputs]
    assert torch.equal(panels.reshape(-1)[:words.numel()], words.reshape(-1))


def test_loader_rule_without_bf16_instructions(tmp_path, monkeypatch):
    """A CPU with neither AMX nor AVX512-BF16 keeps the per-op bfloat16 model; one with AVX512-BF16 packs."""
    from tests.model.tiny_models import build_tiny_model
    from tokenmill.model.loader import cpu_packs_16bit, resolve_model_source

    build_tiny_model("smollm").to(torch.bfloat16).save_pretrained(str(tmp_path))
    src = resolve_model_source(str(tmp_path))
    monkeypatch.setattr(QL, "amx_available", lambda: False)
    monkeypatch.setattr(QL, "bf16_dot_available", lambda: False)
    assert not cpu_packs_16bit(src, torch.bfloat16, "cpu", "auto", "auto")
    monkeypatch.setattr(QL, "bf16_dot_available", lambda: True)
    assert cpu_packs_16bit(src, torch.bfloat16, "cpu", "auto", "auto") == QL.available()
    assert not cpu_packs_16bit(src, torch.bfloat16, "cpu", "auto", "float32")


@needs_dot
def test_finalize_packs_16bit_linears_only_with_the_instructions(tmp_path, monkeypatch):
    """finalize_quantized on an AVX512-BF16 CPU: every linear and the head get panels and a row switch; with the
    instructions taken away, the old dense-copy path."""
    from tests.model.tiny_models import build_tiny_model
    from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source

    build_tiny_model("smollm").to(torch.bfloat16).save_pretrained(str(tmp_path))
    src = resolve_model_source(str(tmp_path))
    cfg = load_hf_config(src)
    model = load_model(src, cfg, torch.float32, "cpu", packed_16bit=True)
    linears = [m for m in model.modules() if isinstance(m, Q.QuantizedLinear)]
    assert linears and all(m.qpanels is not None and m.amx_min_rows == Q.BF16_DOT_MIN_ROWS for m in linears)
    assert model.lm_head.qpanels is not None and model.lm_head.amx_min_rows == Q.BF16_DOT_HEAD_MIN_ROWS
    monkeypatch.setattr(Q, "bf16_dot_available", lambda: False)
    model = load_model(src, cfg, torch.float32, "cpu", packed_16bit=True)
    linears = [m for m in model.modules() if isinstance(m, Q.QuantizedLinear)]
    assert all(m.qpanels is None and m.amx_min_rows == 0 and m.weight_dense is not None for m in linears)
