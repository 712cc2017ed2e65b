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


def round_int8_per_32(x: torch.Tensor) -> torch.Tensor:
    """x [N, K] rounded per 32 values to int8 times one float scale (max |x| / 127): the activations of the int8
    tiles (csrc/qlinear.c tm_prepare_x_i8), dense linears' and experts' alike."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(xb * (127 / amax.clamp_min(1e-30))), torch.zeros_like(xb))
    return (q * (amax / 127)).reshape(x.shape)


def fused_moe_reference_i8(x: torch.Tensor, experts: Any, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor) -> torch.Tensor:
    """The reference with each expert projection's input rounded by round_int8_per_32 (gemm auto's int8 paths for
    packed k-quant experts): float64 sums of the dequantized weights, [T, H] float32."""
    w13, w2 = experts.dense()  # [E, 2I, H], [E, H, I]
    t = topk_ids.shape[0]
    out = torch.zeros(t, x.shape[-1], dtype=torch.float64)
    xr = round_int8_per_32(x).double()
    for e in range(w13.shape[0]):
        gate, up = (xr @ w13[e].double().T).chunk(2, dim=-1)  # [T, I] each
        y = round_int8_per_32((F.silu(gate) * up).float()).double() @ w2[e].double().T  # [T, H]
        out += (topk_weights.double() * (topk_ids == e)).sum(dim=-1, keepdim=True) * y
    return out.float()


def fused_moe_reference_bf16(x: torch.Tensor, experts: Any, topk_weights: torch.Tensor,
                             topk_ids: torch.Tensor) -> torch.Tensor:
    """The reference with each expert projection's input and weights rounded to bfloat16 (gemm auto's AMX bf16 tiles
    for experts with many rows: csrc/qlinear_amx.c), float64 sums, [T, H] float32."""
    w13, w2 = experts.dense()  # [E, 2I, H], [E, H, I]
    t = topk_ids.shape[0]
    out = torch.zeros(t, x.shape[-1], dtype=torch.float64)

    def bf(a: torch.Tensor) -> torch.Tensor:
        return a.float().to(torch.bfloat16).double()

    xr = bf(x)
    for e in range(w13.shape[0]):
        gate, up = (xr @ bf(w13[e]).T).chunk(2, dim=-1)  # [T, I] each
        y = bf((F.silu(gate) * up).float()) @ bf(w2[e]).T  # [T, H]
        out += (topk_weights.double() * (topk_ids == e)).sum(dim=-1, keepdim=True) * y
    return out.float()
