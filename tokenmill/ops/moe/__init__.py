"""The fused mixture-of-experts op, behind one interface.

    weights, ids = select_experts(router_logits, top_k, renormalize)   # route: softmax, top-k, renormalize
    (or select_experts_grouped: DeepSeek's softmax / sigmoid + bias scores, grouped top-k, scaling factor)
    out = op(x, experts, weights, ids)                                 # group, run each expert, scatter-add

`experts` is any object with `num_experts`, `dense()` -> (gate_up [E, 2I, H], down [E, H, I]) and, for the
grouped CPU path, `gate_up(e, x)` / `down(e, x)` (tokenmill/model/layers/moe.py: FusedExperts, PackedExperts).
Implementations: reference.fused_moe_reference (pure PyTorch, every expert on every token: the oracle),
cpu.fused_moe_grouped (tokens sorted by expert, one matmul per active expert, packed GGUF experts run by the
qlinear kernel without dense copies), cpu.fused_moe_cpu (packed experts in one C call per layer, threads over
experts and rows; else grouped), triton_moe.fused_moe_triton (CUDA; block-aligned sorted token ids).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

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


def select_experts_grouped(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
                           bias: Optional[torch.Tensor] = None, num_groups: int = 1, topk_groups: int = 1,
                           group_score: str = "max", renormalize: bool = False,
                           scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing, router_logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int64).

    scores = softmax or sigmoid of the logits (float32); the choice is made on scores + bias (V3's
    e_score_correction_bias; None: none), restricted to the topk_groups best of num_groups equal groups of
    experts (a group's score: its best expert, "max" (V2 group_limited_greedy), or the sum of its best two,
    "top2" (V3 noaux_tc)); the weights are the chosen experts' scores without the bias, divided by their sum when
    `renormalize` (V3 norm_topk_prob), times scaling_factor (routed_scaling_factor). num_groups 1 = plain top-k
    (V2 greedy).
    """
    t, e = router_logits.shape
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if group_score not in ("max", "top2"):
        raise ValueError(f"group_score must be 'max' or 'top2', got {group_score!r}")
    if num_groups < 1 or e % num_groups or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"{e} experts cannot be routed in {topk_groups} of {num_groups} groups")
    per_group = e // num_groups
    if not 1 <= top_k <= topk_groups * per_group or (group_score == "top2" and per_group < 2 and num_groups > 1):
        raise ValueError(f"top_k {top_k} must be in [1, {topk_groups * per_group}] (the experts of {topk_groups} "
                         f"groups of {per_group})" + (", and top2 group scores need 2 experts a group"
                                                      if group_score == "top2" else ""))
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    choice = scores + bias.float() if bias is not None else scores  # [T, E]
    if topk_groups < num_groups:
        grouped = choice.view(t, num_groups, per_group)  # [T, G, E/G]
        group_scores = (grouped.max(dim=-1).values if group_score == "max"
                        else grouped.topk(2, dim=-1).values.sum(dim=-1))  # [T, G]
        keep = torch.zeros(t, num_groups, dtype=torch.bool, device=choice.device)
        keep.scatter_(1, torch.topk(group_scores, topk_groups, dim=-1).indices, True)  # [T, G]
        choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


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
