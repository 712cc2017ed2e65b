"""Qwen3 (dense): Llama layers with an RMSNorm over each head of q and k before rotary."""
from __future__ import annotations

from typing import Any

import torch

from tokenmill.model.decoder import GGUF_DENSE_BLOCK, GGUF_QK_NORM, CausalLM, DecoderLayer
from tokenmill.model.layers.attention import SelfAttention, layer_sliding_window
from tokenmill.model.layers.mlp import GatedMLP


def qwen3_attention(config: Any, layer_idx: int, dtype: torch.dtype) -> SelfAttention:
    """Qwen3 attention (dense and MoE): per-head q/k norm, bias on all four projections per attention_bias."""
    bias = bool(getattr(config, "attention_bias", False))
    return SelfAttention(config, layer_idx, dtype, qkv_bias=bias, o_bias=bias, qk_norm="head",
                         sliding_window=layer_sliding_window(config, layer_idx))


class Qwen3ForCausalLM(CausalLM):
    gguf_block_names = {**GGUF_DENSE_BLOCK, **GGUF_QK_NORM}

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype,
                       hidden_act=getattr(config, "hidden_act", "silu"))
        return DecoderLayer(config, qwen3_attention(config, layer_idx, dtype), mlp, dtype)
