"""Grouped fused MoE in PyTorch ops: the CPU path (also correct on any device).

Token-expert pairs are sorted by expert (a stable argsort of the flat expert ids); each active expert runs its
gate|up and down projections once over its rows; the weighted rows are scatter-added into the output. Experts
with no tokens cost nothing. For PackedExperts the projections are the qlinear kernel on the packed GGUF
blocks (Q4_0 / Q4_1 / Q8_0 today; any type `qlinear` learns, K-quants included, works here unchanged), so no
dense copy of the experts is ever made. One kernel call per expert and projection, not one per layer: a single
C call over all experts (threads over experts and rows) is not written yet.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """topk_ids [T, K] -> (order [T*K]: flat pair indices sorted by expert, token of each sorted pair [T*K],
    number of pairs per expert [E])."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [T*K]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order // topk_ids.shape[1], counts


def fused_moe_grouped(x: torch.Tensor, experts: Any, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], topk_weights / topk_ids [T, K] -> [T, H] (x's dtype), summed in float32."""
    t, hidden = x.shape
    out = torch.zeros(t, hidden, dtype=torch.float32, device=x.device)
    if t == 0:
        return out.to(x.dtype)
    order, tokens, counts = group_by_expert(topk_ids, experts.num_experts)
    weights = topk_weights.reshape(-1).float()[order]  # [T*K] in sorted order
    xs = x.index_select(0, tokens)  # [T*K, H]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate, up = experts.gate_up(e, xs[rows]).chunk(2, dim=-1)  # [n, I] each
        y = experts.down(e, F.silu(gate) * up)  # [n, H]
        out.index_add_(0, tokens[rows], y.float() * weights[rows, None])
        start += n
    return out.to(x.dtype)
