"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v bias); MoE layers with a shared expert scaled
by a sigmoid gate; top-k weights renormalized only with `norm_topk_prob`. Layers listed in `mlp_only_layers`,
or off the `decoder_sparse_step` stride, are dense MLPs."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tokenmill.model.decoder import GGUF_DENSE_BLOCK, CausalLM, DecoderLayer
from tokenmill.model.layers.attention import SelfAttention, layer_sliding_window
from tokenmill.model.layers.mlp import GatedMLP
from tokenmill.model.layers.moe import EXPERT_RULES, GGUF_MOE_BLOCK, MoEBlock, gguf_moe_kwargs

GGUF_SHARED_EXPERT = {
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}


def is_moe_layer(config: Any, layer_idx: int) -> bool:
    """transformers' rule for Qwen2/3-MoE: not in mlp_only_layers, and on the decoder_sparse_step stride."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer_idx + 1) % step == 0)


def qwen_moe_mlp(config: Any, layer_idx: int, dtype: torch.dtype, shared: int = 0) -> nn.Module:
    """The feed-forward block of a Qwen MoE layer: MoEBlock or, off the sparse stride, a dense GatedMLP."""
    act = getattr(config, "hidden_act", "silu")
    if not is_moe_layer(config, layer_idx):
        return GatedMLP(config.hidden_size, config.intermediate_size, dtype, hidden_act=act)
    return MoEBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                    config.moe_intermediate_size, renormalize=bool(getattr(config, "norm_topk_prob", False)),
                    dtype=dtype, shared_intermediate_size=shared, hidden_act=act)


class Qwen2MoeForCausalLM(CausalLM):
    checkpoint_rules = EXPERT_RULES
    gguf_block_names = {**GGUF_DENSE_BLOCK, **GGUF_MOE_BLOCK, **GGUF_SHARED_EXPERT}

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        attn = SelfAttention(config, layer_idx, dtype, qkv_bias=bool(getattr(config, "qkv_bias", True)),
                             sliding_window=layer_sliding_window(config, layer_idx))
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        return DecoderLayer(config, attn, qwen_moe_mlp(config, layer_idx, dtype, shared), dtype)

    @classmethod
    def gguf_config_kwargs(cls, meta: Callable[[str], Any]) -> dict[str, Any]:
        return {**gguf_moe_kwargs(meta), "moe_intermediate_size": int(meta("expert_feed_forward_length")),
                "shared_expert_intermediate_size": int(meta("expert_shared_feed_forward_length") or 0)}
