"""Fused MoE in Triton (CUDA; on the CPU only in Triton's interpreter, for tests).

The token-expert pairs are sorted by expert and each expert's run padded to a multiple of BLOCK_M
(`align_block_size`), so every BLOCK_M rows of the sorted list belong to one expert: one program multiplies
those rows by that expert's weights. Two grouped GEMMs: x @ gate_up[e]^T for every pair, silu(gate) * up, then
@ down[e]^T scaled by the routing weight; the K rows of a token are summed at the end. Everything stays on the
device with fixed sizes (no host sync), so the op can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 16


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] -> (sorted pair ids [P] int32, expert of each block of block_m rows [P / block_m] int32).

    Pair ids are t * K + k, sorted by expert (stably); each expert's run is padded with the id T*K (no pair) up
    to a multiple of block_m; blocks past the last expert's run have expert -1. P = T*K + E*(block_m - 1) rounded
    up to block_m: fixed by the shapes, not the routing."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    size = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pair ids by expert
    expert_sorted = flat[order]
    rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[expert_sorted]  # index within expert
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=device)
    sorted_ids[padded_start[expert_sorted] + rank] = order.to(torch.int32)
    starts = torch.arange(0, size, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, starts, right=True)  # the expert whose padded run holds the block
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, sorted_ids_ptr, block_expert_ptr,
                     N, K, num_pairs, top_k,
                     stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                     A_PER_PAIR: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[pair, n] = sum_k A[row(pair), k] * B[e, n, k] (* w[pair]) for the BLOCK_M pairs of one expert block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)  # [BM]
        valid = pair < num_pairs
        if A_PER_PAIR:
            a_row = pair
        else:
            a_row = pair // top_k
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)  # [BM, BK]
            b = tl.load(b_ptr + e.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                        mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)  # [BK, BN]
            acc += tl.dot(a, b, input_precision="ieee")
        if MUL_WEIGHT:
            w = tl.load(w_ptr + pair, mask=valid, other=0.0)
            acc = acc * w[:, None]
        tl.store(c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor, sorted_ids: torch.Tensor,
                  block_expert: torch.Tensor, top_k: int, a_per_pair: bool, mul_weight: bool) -> None:
    n, k = b.shape[1], b.shape[2]
    block_n, block_k = 64, 32
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](a, b, c, weights, sorted_ids, block_expert, n, k, c.shape[0], top_k,
                           a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
                           A_PER_PAIR=a_per_pair, MUL_WEIGHT=mul_weight, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                           BLOCK_K=block_k)


def fused_moe_triton(x: torch.Tensor, experts: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], topk_weights / topk_ids [T, K] -> [T, H] (x's dtype); the interface of tokenmill.ops.moe."""
    w13, w2 = experts.dense()  # [E, 2I, H], [E, H, I]
    t, top_k = topk_ids.shape
    hidden = x.shape[-1]
    if t == 0:
        return torch.zeros(0, hidden, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    sorted_ids, block_expert = align_block_size(topk_ids, w13.shape[0])
    weights = topk_weights.reshape(-1).float().contiguous()  # [T*K]
    gate_up = torch.empty(t * top_k, w13.shape[1], dtype=x.dtype, device=x.device)  # [T*K, 2I]
    _grouped_gemm(x, w13, gate_up, weights, sorted_ids, block_expert, top_k, a_per_pair=False, mul_weight=False)
    gate, up = gate_up.chunk(2, dim=-1)
    act = (F.silu(gate) * up).contiguous()  # [T*K, I]
    out = torch.empty(t * top_k, hidden, dtype=torch.float32, device=x.device)  # [T*K, H], weighted
    _grouped_gemm(act, w2, out, weights, sorted_ids, block_expert, top_k, a_per_pair=True, mul_weight=True)
    return out.view(t, top_k, hidden).sum(dim=1).to(x.dtype)  # [T, H]
