"""Qwen3-MoE: Qwen3 attention (per-head q/k norm); MoE layers without a shared expert, top-k weights renormalized
per `norm_topk_prob` (true in the released models); `mlp_only_layers` / `decoder_sparse_step` as Qwen2-MoE."""
from __future__ import annotations

from typing import Any, Callable

import torch

from tokenmill.model.decoder import GGUF_DENSE_BLOCK, GGUF_QK_NORM, CausalLM, DecoderLayer
from tokenmill.model.layers.moe import EXPERT_RULES, GGUF_MOE_BLOCK, gguf_moe_kwargs
from tokenmill.model.qwen2_moe import qwen_moe_mlp
from tokenmill.model.qwen3 import qwen3_attention


class Qwen3MoeForCausalLM(CausalLM):
    checkpoint_rules = EXPERT_RULES
    gguf_block_names = {**GGUF_DENSE_BLOCK, **GGUF_QK_NORM, **GGUF_MOE_BLOCK}

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        return DecoderLayer(config, qwen3_attention(config, layer_idx, dtype), qwen_moe_mlp(config, layer_idx, dtype),
                            dtype)

    @classmethod
    def gguf_config_kwargs(cls, meta: Callable[[str], Any]) -> dict[str, Any]:
        # llama.cpp's qwen3moe normalizes unless the file says otherwise
        return {**gguf_moe_kwargs(meta, norm_default=True),
                "moe_intermediate_size": int(meta("expert_feed_forward_length"))}
