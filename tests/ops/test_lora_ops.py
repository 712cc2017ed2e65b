"""Batched LoRA ops on random segments (empty ones included): BGMV / SGMV references against a plain per-row loop,
the CPU grouped path and the Triton kernels (in Triton's interpreter without CUDA) against the reference."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from tokenmill.ops.cpu.lora import lora_grouped_cpu
from tokenmill.ops.lora.reference import LoRALayout, bgmv_reference, lora_reference, sgmv_reference


def _case(seed: int, n_in=40, k=24, n_out=72, slots=4, lens=(3, 0, 1, 7, 1, 0, 18, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    x = torch.randn(T, n_in, generator=g)
    a = torch.randn(slots, n_in, k, generator=g) * 0.3
    b = torch.randn(slots, k, n_out, generator=g) * 0.3
    y = torch.randn(T, n_out, generator=g)
    req_slots = [int(torch.randint(-1, slots, (1,), generator=g)) for _ in lens]
    return x, a, b, y, list(lens), req_slots


def _naive(y, x, a, b, lens, req_slots):
    out = y.clone()
    pos = 0
    for n, s in zip(lens, req_slots):
        for r in range(pos, pos + n):
            if s >= 0:
                out[r] += x[r] @ a[s] @ b[s]
        pos += n
    return out


@pytest.mark.parametrize("seed", range(4))
def test_reference_and_cpu_match_naive(seed):
    x, a, b, y, lens, req_slots = _case(seed)
    want = _naive(y, x, a, b, lens, req_slots)
    layout = LoRALayout.build(req_slots, lens)
    for op in (lora_reference, lora_grouped_cpu):
        got = y.clone()
        op(got, x, a, b, layout)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    starts = [sum(lens[:i]) for i in range(len(lens))]  # sgmv over every segment, empty and base ones skipped
    got = y.clone()
    keep = [i for i, s in enumerate(req_slots) if s >= 0]
    sgmv_reference(got, x, a, b, [starts[i] for i in keep], [lens[i] for i in keep], [req_slots[i] for i in keep])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([r for i in keep for r in range(starts[i], starts[i] + lens[i])], dtype=torch.long)
    rslots = torch.tensor([req_slots[i] for i in keep for _ in range(lens[i])], dtype=torch.long)
    got = y.clone()
    bgmv_reference(got, x, a, b, rows, rslots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_all_base_layout_is_empty():
    assert LoRALayout.build([-1, -1], [3, 1]).is_empty


@pytest.mark.kernel
@pytest.mark.parametrize("seed", range(3))
def test_triton_matches_reference(seed, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    import tokenmill.ops.lora.triton_lora as T

    if not torch.cuda.is_available() and type(T._sgmv_shrink_kernel).__name__ != "InterpretedFunction":
        T = importlib.reload(T)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, a, b, y, lens, req_slots = _case(seed, n_in=40, k=20, n_out=70)
    want = y.clone()
    layout = LoRALayout.build(req_slots, lens)
    lora_reference(want, x, a, b, layout)
    got = y.clone().to(dev)
    T.lora_triton(got, x.to(dev), a.to(dev), b.to(dev), LoRALayout.build(req_slots, lens, dev))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    # SGMV directly over segments that include empty ones
    starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], dtype=torch.int32, device=dev)
    slots = torch.tensor([max(s, 0) for s in req_slots], dtype=torch.int32, device=dev)
    got = y.clone().to(dev)
    T.sgmv_triton(got, x.to(dev), a.to(dev), b.to(dev), starts, torch.tensor(lens, dtype=torch.int32, device=dev),
                  slots)
    want = _naive(y, x, a, b, lens, [max(s, 0) for s in req_slots])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
