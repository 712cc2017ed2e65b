"""Llama family: Llama 2/3/3.x, SmolLM, Mistral (sliding window). Dense decoder layers, q/k/v and o bias per
`attention_bias`, MLP bias per `mlp_bias`. llama.cpp's converter permutes their attn_q / attn_k rows."""
from __future__ import annotations

from typing import Any

import torch

from tokenmill.model.decoder import CausalLM, DecoderLayer
from tokenmill.model.layers.attention import SelfAttention, layer_sliding_window
from tokenmill.model.layers.mlp import GatedMLP


class LlamaForCausalLM(CausalLM):
    gguf_permuted_qk = True

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        bias = bool(getattr(config, "attention_bias", False))
        attn = SelfAttention(config, layer_idx, dtype, qkv_bias=bias, o_bias=bias,
                             sliding_window=layer_sliding_window(config, layer_idx))
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype,
                       bias=bool(getattr(config, "mlp_bias", False)), hidden_act=getattr(config, "hidden_act", "silu"))
        return DecoderLayer(config, attn, mlp, dtype)
