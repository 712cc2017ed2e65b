"""The int8 panels of a GGUF's block-quantized weight (csrc/qlinear_i8gemm.c: AVX512-VNNI, CPUs without AMX) against a
pure-PyTorch reference of the same integer arithmetic: the dequantized weight requantized to int8 per (output, group
of G k's), x per (row, group), int32 sums per group scaled by both scales and summed in float. Odd M 1..~200 (every
row-block size, tails past a chunk), N not a multiple of 32, K of several groups (G 64 and 32), bias, the gate|up
panels and their silu(gate) * up epilogue, each block type the loader keeps packed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenmill.ops.cpu import qlinear as QL

needs_i8 = pytest.mark.skipif(not (QL.available() and QL.i8gemm_available()),
                              reason="no AVX512-VNNI int8 panels here (kernel not built with it)")


def _requantize(v: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [r, k] -> (int8 values as float64 [r, k], scales [r, k / g]) as the kernel rounds: per group, scale =
    amax / 127, q = rint(v * (127 / amax)) clamped to [-127, 127] (0 for an all-zero group)."""
    r, k = v.shape
    vg = v.reshape(r, k // g, g)
    amax = vg.abs().amax(-1)
    s = amax / 127.0
    # a true division (127.0 / tensor would be reciprocal() * 127 in torch: two roundings)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = (vg * inv.unsqueeze(-1)).clamp(-127, 127).round()
    return q.reshape(r, k).double(), s


def reference(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """x [m, k] float32, w [n, k] the dequantized weight -> y [m, n]: the kernel's integer arithmetic, exactly in
    float64 (the int32 group sums are exact; only the float scaling and sums differ in rounding)."""
    k = x.shape[1]
    g = QL.i8_group(k)
    qx, sx = _requantize(x.float(), g)
    qw, sw = _requantize(w.float(), g)
    ng = k // g
    dots = torch.einsum("mgk,ngk->mng", qx.reshape(-1, ng, g), qw.reshape(-1, ng, g))  # exact integers
    y = (dots * sx.double().unsqueeze(1) * sw.double().unsqueeze(0)).sum(-1)
    return (y + bias.double() if bias is not None else y).float()


def _packed(qtype: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, row_bytes], its dequantization [n, k]) of random weights of the block type."""
    rng = np.random.default_rng(seed)
    if qtype in ("q4_k", "q5_k", "q6_k"):
        from tests.ops.kquant_blocks import quantize

        w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
        packed = torch.from_numpy(quantize(w, qtype))
    else:
        from tests.ops.test_qlinear import _packed as legacy

        packed, _ = legacy(qtype, n, k, seed)
    return packed, QL.dequantize(packed, qtype, k)


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias) -> None:
    ref = reference(x, w, bias)
    scale = (x.abs().double() @ w.abs().double().T).max().item()
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= 2e-6 * scale, err / scale


@needs_i8
@pytest.mark.parametrize("qtype,n,k", [("q4_0", 45, 160), ("q4_1", 70, 576), ("q8_0", 33, 96),
                                       ("q4_k", 47, 512), ("q5_k", 40, 256), ("q6_k", 90, 768)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_integer_reference(qtype, n, k, bias):
    packed, w = _packed(qtype, n, k, seed=n + k)
    buf, st = QL.i8_pack(packed, qtype, k)
    assert buf.numel() == QL.i8_panel_bytes(k, n)
    g = torch.Generator().manual_seed(k)
    b = torch.randn(n, generator=g) if bias else None
    for m in [1, 2, 3, 5, 6, 7, 11, 13, 25, 37, 61, 99, 201]:
        x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3
        _check(QL.qlinear(x, packed, qtype, b, amx_min_rows=1, qpanels=st), x, w, b)


@needs_i8
def test_long_call_spans_row_chunks_and_zero_groups():
    """2000 rows at K = 1536 (several L2 chunks of x, the last partial); all-zero rows and groups of x."""
    packed, w = _packed("q4_1", 40, 1536, seed=3)
    _, st = QL.i8_pack(packed, "q4_1", 1536)
    x = torch.randn(2000, 1536, generator=torch.Generator().manual_seed(4))
    x[5] = 0
    x[7, 64:128] = 0
    _check(QL.qlinear(x, packed, "q4_1", amx_min_rows=4, qpanels=st), x, w, None)


@needs_i8
def test_rows_below_the_switch_stay_on_the_blocks():
    packed, w = _packed("q4_0", 33, 128, seed=5)
    _, st = QL.i8_pack(packed, "q4_0", 128)
    x = torch.randn(3, 128)
    assert torch.equal(QL.qlinear(x, packed, "q4_0", amx_min_rows=4, qpanels=st), QL.qlinear(x, packed, "q4_0"))


@needs_i8
@pytest.mark.parametrize("m", [1, 5, 13, 64, 131])
def test_gate_up_panels_and_glu_epilogue(m):
    i, k = 48, 192
    packed, w = _packed("q4_1", 2 * i, k, seed=m)
    b = torch.randn(2 * i)
    _, st = QL.i8_pack(packed, "q4_1", k, glu=i)
    x = torch.randn(m, k)
    _check(QL.qlinear(x, packed, "q4_1", b, amx_min_rows=1, qpanels=st), x, w, b)  # [gate | up] as usual
    ref = reference(x, w, b)
    scale = (x.abs().double() @ w.abs().double().T).max().item()
    act = QL.glu_linear(x, st, b, amx_min_rows=1)
    torch.testing.assert_close(act, F.silu(ref[:, :i]) * ref[:, i:], rtol=1e-4, atol=1e-5 * scale)


@needs_i8
def test_pack_rejects_16bit_weights_and_bad_shapes():
    packed = torch.zeros(32, 2 * 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="block-quantized"):
        QL.i8_pack(packed, "bf16", 64)
    q, _ = _packed("q8_0", 40, 64, seed=1)
    with pytest.raises(ValueError, match="glu"):
        QL.i8_pack(q, "q8_0", 64, glu=16)
    with pytest.raises(ValueError, match="bytes per row"):
        QL.i8_pack(q, "q8_0", 96)


def test_gemm_dtype_int8_setting(monkeypatch):
    """gemm_dtype int8 is a valid setting (bad names keep their clear error); it needs the VNNI build; auto takes the
    int8 panels only on a VNNI CPU without AMX; 16-bit weights never take them."""
    import tokenmill.model.layers.quantized as Q
    from tokenmill.config import ModelConfig
    from tokenmill.errors import ConfigError

    ModelConfig(gemm_dtype="int8").validate()
    with pytest.raises(ConfigError, match="int8"):
        ModelConfig(gemm_dtype="int4").validate()
    assert Q.resolve_gemm_dtype("int8") == torch.bfloat16  # what does not take the panels: bf16 as before
    monkeypatch.setattr(Q, "i8gemm_available", lambda: False)
    with pytest.raises(ValueError, match="AVX512-VNNI"):
        Q.gemm_int8("int8")
    assert not Q.gemm_int8("auto")
    monkeypatch.setattr(Q, "i8gemm_available", lambda: True)
    monkeypatch.setattr(Q, "amx_available", lambda: True)
    assert Q.gemm_int8("int8") and not Q.gemm_int8("auto") and not Q.gemm_int8("bfloat16")
    monkeypatch.setattr(Q, "amx_available", lambda: False)
    assert Q.gemm_int8("auto") and not Q.gemm_int8("float32")
    assert not Q.takes_int8("bf16", True) and not Q.takes_int8("q4_1", False) and Q.takes_int8("q6_k", True)
