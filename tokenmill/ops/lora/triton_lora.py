"""Batched LoRA as Triton kernels (Punica's split): SGMV for prompt segments (a segment's rows in BLOCK_M tiles,
tl.dot against its adapter's A then B) and BGMV for decode rows (one row per program, multiply-and-sum).
Both go through a float32 intermediate h [T, K] (shrink: h = x @ a[slot]; expand: y += h @ b[slot]).
Layout as in tokenmill/ops/lora/__init__.py; tested against reference.py under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.lora.reference import LoRALayout

Tensor = torch.Tensor


@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, starts_ptr, lens_ptr, slots_ptr, n_in, k_dim,
                        sx, sa_s, sa_i, sh, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr):
    seg = tl.program_id(0)
    kb = tl.program_id(1)
    start = tl.load(starts_ptr + seg)
    n = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    for m0 in range(0, n, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < n
        grow = (start + rows).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for i0 in range(0, n_in, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            imask = offs_i < n_in
            xt = tl.load(x_ptr + grow[:, None] * sx + offs_i[None, :], mask=rmask[:, None] & imask[None, :],
                         other=0.0).to(tl.float32)
            at = tl.load(a_ptr + slot * sa_s + offs_i[:, None] * sa_i + offs_k[None, :],
                         mask=imask[:, None] & (offs_k[None, :] < k_dim), other=0.0).to(tl.float32)
            acc += tl.dot(xt, at, input_precision="ieee")
        tl.store(h_ptr + grow[:, None] * sh + offs_k[None, :], acc, mask=rmask[:, None] & (offs_k[None, :] < k_dim))


@triton.jit
def _sgmv_expand_kernel(h_ptr, b_ptr, y_ptr, starts_ptr, lens_ptr, slots_ptr, k_dim, n_out,
                        sh, sb_s, sb_k, sy, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    nb = tl.program_id(1)
    start = tl.load(starts_ptr + seg)
    n = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_out
    for m0 in range(0, n, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < n
        grow = (start + rows).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < k_dim
            ht = tl.load(h_ptr + grow[:, None] * sh + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            bt = tl.load(b_ptr + slot * sb_s + offs_k[:, None] * sb_k + offs_n[None, :],
                         mask=kmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(ht, bt, input_precision="ieee")
        ptrs = y_ptr + grow[:, None] * sy + offs_n[None, :]
        m2 = rmask[:, None] & nmask[None, :]
        y = tl.load(ptrs, mask=m2, other=0.0)
        tl.store(ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=m2)


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, rows_ptr, slots_ptr, n_in, k_dim, sx, sa_s, sa_i, sh,
                        BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr):
    i = tl.program_id(0)
    kb = tl.program_id(1)
    row = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < k_dim
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for i0 in range(0, n_in, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        imask = offs_i < n_in
        xv = tl.load(x_ptr + row * sx + offs_i, mask=imask, other=0.0).to(tl.float32)
        at = tl.load(a_ptr + slot * sa_s + offs_i[:, None] * sa_i + offs_k[None, :],
                     mask=imask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, None] * at, axis=0)
    tl.store(h_ptr + row * sh + offs_k, acc, mask=kmask)


@triton.jit
def _bgmv_expand_kernel(h_ptr, b_ptr, y_ptr, rows_ptr, slots_ptr, k_dim, n_out, sh, sb_s, sb_k, sy,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(0)
    nb = tl.program_id(1)
    row = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_dim
        hv = tl.load(h_ptr + row * sh + offs_k, mask=kmask, other=0.0)
        bt = tl.load(b_ptr + slot * sb_s + offs_k[:, None] * sb_k + offs_n[None, :],
                     mask=kmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(hv[:, None] * bt, axis=0)
    y = tl.load(y_ptr + row * sy + offs_n, mask=nmask, other=0.0)
    tl.store(y_ptr + row * sy + offs_n, (y.to(tl.float32) + acc).to(y.dtype), mask=nmask)


BLOCK_M, BLOCK_K, BLOCK_I, BLOCK_N = 16, 16, 64, 64


def sgmv_triton(y: Tensor, x: Tensor, a: Tensor, b: Tensor, starts: Tensor, lens: Tensor, slots: Tensor) -> None:
    """y[s:s+n] += x[s:s+n] @ a[slot] @ b[slot] per segment (device int32 tensors; empty segments allowed)."""
    nseg = starts.numel()
    if nseg == 0:
        return
    k_dim, n_in, n_out = a.shape[2], a.shape[1], b.shape[2]
    a, b = a.contiguous(), b.contiguous()
    h = torch.zeros(x.shape[0], k_dim, dtype=torch.float32, device=x.device)
    _sgmv_shrink_kernel[(nseg, triton.cdiv(k_dim, BLOCK_K))](
        x, a, h, starts, lens, slots, n_in, k_dim, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_I=BLOCK_I)
    _sgmv_expand_kernel[(nseg, triton.cdiv(n_out, BLOCK_N))](
        h, b, y, starts, lens, slots, k_dim, n_out, h.stride(0), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def bgmv_triton(y: Tensor, x: Tensor, a: Tensor, b: Tensor, rows: Tensor, slots: Tensor) -> None:
    """y[rows[i]] += x[rows[i]] @ a[slots[i]] @ b[slots[i]] (device int32 tensors)."""
    n = rows.numel()
    if n == 0:
        return
    k_dim, n_in, n_out = a.shape[2], a.shape[1], b.shape[2]
    a, b = a.contiguous(), b.contiguous()
    h = torch.zeros(x.shape[0], k_dim, dtype=torch.float32, device=x.device)
    _bgmv_shrink_kernel[(n, triton.cdiv(k_dim, BLOCK_K))](
        x, a, h, rows, slots, n_in, k_dim, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        BLOCK_K=BLOCK_K, BLOCK_I=BLOCK_I)
    _bgmv_expand_kernel[(n, triton.cdiv(n_out, BLOCK_N))](
        h, b, y, rows, slots, k_dim, n_out, h.stride(0), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def lora_triton(y: Tensor, x: Tensor, a: Tensor, b: Tensor, layout: LoRALayout) -> None:
    """BGMV over the decode rows, SGMV over the prompt segments; the index tensors are built once per step."""
    t = layout.device_tensors.get("triton")
    if t is None:
        dec, pre = layout.decode_and_prompt()

        def dev(v: list[int]) -> Tensor:
            return torch.tensor(v, dtype=torch.int32).to(x.device, non_blocking=True)

        t = layout.device_tensors["triton"] = (dev([r for r, _ in dec]), dev([s for _, s in dec]),
                                               dev([p[0] for p in pre]), dev([p[1] for p in pre]),
                                               dev([p[2] for p in pre]))
    rows, rslots, starts, lens, sslots = t
    bgmv_triton(y, x, a, b, rows, rslots)
    sgmv_triton(y, x, a, b, starts, lens, sslots)
