"""Mixtral: Llama attention, every layer a sparse MoE of `num_local_experts` (softmax, top-k, always renormalized).

Checkpoints name the block `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down); transformers 5 also
writes fused `mlp.experts.gate_up_proj` / `down_proj`. llama.cpp stores Mixtral as arch "llama" with
`llama.expert_count` and 3-D ffn_*_exps tensors (q/k rows permuted like any llama-arch file).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from tokenmill.model.decoder import GGUF_DENSE_BLOCK, CausalLM, DecoderLayer
from tokenmill.model.layers.attention import SelfAttention, layer_sliding_window
from tokenmill.model.layers.moe import EXPERT_RULES, GGUF_MOE_BLOCK, MoEBlock, gguf_moe_kwargs


def _expert(j: Any) -> Callable:
    return lambda m: (int(m[2]), j) if j is not None else int(m[2])


class MixtralForCausalLM(CausalLM):
    checkpoint_rules = (
        (r"(.*)\.block_sparse_moe\.gate\.weight", r"\1.mlp.gate.weight", None),
        (r"(.*)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"\1.mlp.experts.gate_up_proj", _expert(0)),
        (r"(.*)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"\1.mlp.experts.gate_up_proj", _expert(1)),
        (r"(.*)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"\1.mlp.experts.down_proj", _expert(None)),
    ) + EXPERT_RULES
    gguf_block_names = {**GGUF_DENSE_BLOCK, **GGUF_MOE_BLOCK}
    gguf_permuted_qk = True

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        attn = SelfAttention(config, layer_idx, dtype, sliding_window=layer_sliding_window(config, layer_idx))
        moe = MoEBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                       config.intermediate_size, renormalize=True, dtype=dtype,
                       hidden_act=getattr(config, "hidden_act", "silu"))
        return DecoderLayer(config, attn, moe, dtype)

    @classmethod
    def gguf_config_kwargs(cls, meta: Callable[[str], Any]) -> dict[str, Any]:
        kwargs = gguf_moe_kwargs(meta, "num_local_experts")
        del kwargs["norm_topk_prob"]  # Mixtral always renormalizes
        return kwargs
