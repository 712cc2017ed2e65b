"""Reference fused MoE: every expert on every token, then the routed weighted sum. Slow, obviously right: the
oracle of the grouped CPU path and the Triton kernel."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: x [N, H], gate_up [2I, H], down [H, I] -> down(silu(gate x) * up x) [N, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [N, I] each
    return F.linear(F.silu(gate) * up, down)  # [N, H]


def fused_moe_reference(x: torch.Tensor, experts: Any, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], topk_weights / topk_ids [T, K] -> sum_k w[t, k] * expert_{ids[t, k]}(x[t]) [T, H] (x's dtype)."""
    w13, w2 = experts.dense()  # [E, 2I, H], [E, H, I]
    t, k = topk_ids.shape
    out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
    if t == 0:
        return out.to(x.dtype)
    for e in range(w13.shape[0]):
        y = expert_mlp(x, w13[e].to(x.dtype), w2[e].to(x.dtype)).float()  # [T, H]: expert e on every token
        w = (topk_weights.float() * (topk_ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]: 0 where not routed
        out += w * y
    return out.to(x.dtype)
