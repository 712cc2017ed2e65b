"""OLMoE: q and k RMSNorm over the whole projection (not per head), optional clip_qkv, every layer a MoE of
`num_experts` without a shared expert, top-k weights renormalized per `norm_topk_prob` (false in OLMoE-1B-7B)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from tokenmill.model.decoder import GGUF_DENSE_BLOCK, GGUF_QK_NORM, CausalLM, DecoderLayer
from tokenmill.model.layers.attention import SelfAttention
from tokenmill.model.layers.moe import EXPERT_RULES, GGUF_MOE_BLOCK, MoEBlock, gguf_moe_kwargs


class OlmoeForCausalLM(CausalLM):
    checkpoint_rules = EXPERT_RULES
    gguf_block_names = {**GGUF_DENSE_BLOCK, **GGUF_QK_NORM, **GGUF_MOE_BLOCK}

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        bias = bool(getattr(config, "attention_bias", False))
        clip = getattr(config, "clip_qkv", None)
        attn = SelfAttention(config, layer_idx, dtype, qkv_bias=bias, o_bias=bias, qk_norm="full",
                             clip_qkv=float(clip) if clip is not None else None)  # no sliding window
        moe = MoEBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok, config.intermediate_size,
                       renormalize=bool(getattr(config, "norm_topk_prob", False)), dtype=dtype,
                       hidden_act=getattr(config, "hidden_act", "silu"))
        return DecoderLayer(config, attn, moe, dtype)

    @classmethod
    def gguf_config_kwargs(cls, meta: Callable[[str], Any]) -> dict[str, Any]:
        clip = meta("attention.clamp_kqv")
        return {**gguf_moe_kwargs(meta), "clip_qkv": float(clip) if clip else None}
