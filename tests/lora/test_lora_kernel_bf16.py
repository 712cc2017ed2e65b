"""csrc/lora.c's kernels (tm_lora_apply) called directly on random segments, against the PyTorch reference
(tokenmill/ops/lora/reference.py's sgmv_reference): the float32 kernel to float rounding, the bfloat16 kernel
(A, B packed by runtime.py's _Projection.pack_bf16) to the reference run on the same bfloat16-rounded operands.
Shapes cover packed slices, odd fan-in, ranks whose K is no multiple of 16, odd ranks, column tails, empty and
base-only spans, a row offset (the post half's row blocks), the row-by-row split of one short span and spans of 16
rows and more (the AMX blocks where the tile unit is usable)."""
from __future__ import annotations

import ctypes

import pytest
import torch

from tokenmill.lora.runtime import _Projection
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.layer import TmLoRA, _lib, lora_bf16_available
from tokenmill.ops.lora.reference import sgmv_reference

pytestmark = pytest.mark.skipif(_lib() is None, reason=f"layer kernel not built: {build_error('layer')}")

# (fan_in, slice outs, rank)
SHAPES = [(576, [576, 192, 192], 16), (576, [1536, 1536], 16), (1536, [576], 16), (37, [40, 19], 3),
          (64, [33, 17, 5], 4), (130, [100], 8), (96, [256], 32)]
# spans (start, len, slot) over m rows (rows outside every span are base rows)
SPANS = [(16, [(0, 2, 0), (2, 2, 3), (4, 2, 1), (6, 2, 2), (8, 8, 5)]),
         (23, [(1, 0, 0), (1, 7, 2), (8, 1, 1), (12, 11, 4)]),
         (3, [(0, 3, 1)]),
         (70, [(0, 64, 0), (64, 6, 2)]),
         (90, [(0, 37, 3), (37, 16, 1), (60, 30, 0)])]


def _apply(proj: _Projection, x: torch.Tensor, y: torch.Tensor, spans, r0: int, bf16: bool) -> None:
    lib = _lib()
    lib.tm_lora_apply.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.tm_lora_apply.restype = ctypes.c_int
    st = TmLoRA()
    p = st.proj[0]
    p.a, p.b, p.k = proj.a.data_ptr(), proj.b.data_ptr(), proj.a.shape[2]
    p.nslices, p.cols = len(proj.outs), proj.cols.data_ptr()
    if bf16:
        p.a16, p.b16 = proj.a16.data_ptr(), proj.b16.data_ptr()
    t = torch.tensor(spans, dtype=torch.int64).t().contiguous()
    st.num_groups, st.starts, st.lens, st.slots = t.shape[1], t[0].data_ptr(), t[1].data_ptr(), t[2].data_ptr()
    m, fan_in = x.shape
    assert lib.tm_lora_apply(ctypes.byref(st), 0, x.data_ptr(), r0, m, fan_in, y.data_ptr(), y.shape[1]) == 0


def _projection(fan_in: int, outs: list[int], rank: int, seed: int) -> _Projection:
    g = torch.Generator().manual_seed(seed)
    proj = _Projection(fan_in, outs, 6, rank, torch.float32, torch.device("cpu"))
    for slot in range(6):
        proj.a[slot] = torch.randn(fan_in, len(outs) * rank, generator=g) * 0.1
        for i, (o0, n) in enumerate(zip(proj.offsets, outs)):
            proj.b[slot, i * rank:(i + 1) * rank, o0:o0 + n] = torch.randn(rank, n, generator=g) * 0.1
    return proj


def _bf(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", range(len(SPANS)))
def test_lora_kernel_matches_reference(shape, case, bf16):
    if bf16 and not lora_bf16_available():
        pytest.skip("no AVX512-BF16 kernel on this CPU")
    fan_in, outs, rank = shape
    m, spans = SPANS[case]
    proj = _projection(fan_in, outs, rank, seed=case)
    if bf16:
        proj.enable_bf16()
    g = torch.Generator().manual_seed(100 + case)
    r0 = 5  # x and y hold rows [r0, r0 + m) of the step; the spans count from the step's row 0
    x = torch.randn(m, fan_in, generator=g)
    y0 = torch.randn(m, sum(outs), generator=g)
    steps = spans  # in x's rows
    y = y0.clone()
    _apply(proj, x, y, [(s + r0, n, slot) for s, n, slot in spans], r0, bf16)
    ref = y0.clone()
    if bf16:  # the reference on the kernel's operands: x, A, h = x A and B rounded to bfloat16
        for s, n, slot in steps:
            if n:
                h = _bf(_bf(x[s:s + n]) @ _bf(proj.a[slot]))
                ref[s:s + n] += h @ _bf(proj.b[slot])
    else:
        sgmv_reference(ref, x, proj.a, proj.b, [s for s, _, _ in steps], [n for _, n, _ in steps],
                       [slot for _, _, slot in steps])
    term = (ref - y0).abs().max()
    assert term > 0
    # float32: summation order only; bfloat16: also h's rounding (an element may round the other way)
    tol = 2e-5 if not bf16 else 1e-2
    assert (y - ref).abs().max() <= tol * term
    base_rows = torch.ones(m, dtype=torch.bool)
    for s, n, _ in steps:
        base_rows[s:s + n] = False
    assert torch.equal(y[base_rows], y0[base_rows])  # rows of no adapter untouched
    if bf16:  # and the bfloat16 kernel stays close to the float32 reference
        exact = y0.clone()
        sgmv_reference(exact, x, proj.a, proj.b, [s for s, _, _ in steps], [n for _, n, _ in steps],
                       [slot for _, _, slot in steps])
        assert (y - exact).abs().max() <= 3e-2 * term
        assert (y - exact).abs().max() > 1e-5 * term  # (it did round: the bfloat16 kernel ran)
