"""The fused mixture-of-experts op, behind one interface.

    weights, ids = select_experts(router_logits, top_k, renormalize)   # route: softmax, top-k, renormalize
    out = op(x, experts, weights, ids)                                 # group, run each expert, scatter-add

`experts` is any object with `num_experts`, `dense()` -> (gate_up [E, 2I, H], down [E, H, I]) and, for the
grouped CPU path, `gate_up(e, x)` / `down(e, x)` (tokenmill/model/layers/moe.py: FusedExperts, PackedExperts).
Implementations: reference.fused_moe_reference (pure PyTorch, every expert on every token: the oracle),
cpu.fused_moe_grouped (tokens sorted by expert, one matmul per active expert, packed GGUF experts run by the
qlinear kernel without dense copies), cpu.fused_moe_cpu (packed experts in one C call per layer, threads over
experts and rows; else grouped), triton_moe.fused_moe_triton (CUDA; block-aligned sorted token ids).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

MoEOp = Callable[[torch.Tensor, Any, torch.Tensor, torch.Tensor], torch.Tensor]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int64): softmax over all experts in
    float32, the top_k largest, divided by their sum when `renormalize` (Mixtral always; Qwen / OLMoE per
    norm_topk_prob)."""
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in [1, {num_experts}]")
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K] each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def select_moe_op(device: torch.device) -> MoEOp:
    """The op for a device: Triton on CUDA when importable, else the CPU op (one C call per layer for packed
    experts, the grouped PyTorch path otherwise)."""
    from tokenmill.ops.moe.cpu import fused_moe_cpu, fused_moe_grouped

    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is not None:
            from tokenmill.ops.moe.triton_moe import fused_moe_triton

            return fused_moe_triton
        return fused_moe_grouped
    return fused_moe_cpu
