"""Qwen2 / Qwen2.5: Llama layers with a q/k/v bias (no o bias), per-layer sliding window from `layer_types`."""
from __future__ import annotations

from typing import Any

import torch

from tokenmill.model.decoder import CausalLM, DecoderLayer
from tokenmill.model.layers.attention import SelfAttention, layer_sliding_window
from tokenmill.model.layers.mlp import GatedMLP


class Qwen2ForCausalLM(CausalLM):

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        attn = SelfAttention(config, layer_idx, dtype, qkv_bias=True,
                             sliding_window=layer_sliding_window(config, layer_idx))
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype,
                       hidden_act=getattr(config, "hidden_act", "silu"))
        return DecoderLayer(config, attn, mlp, dtype)
