"""DeepSeek-V2 / V3: multi-head latent attention (layers/mla.py, a compressed latent KV cache) and DeepSeek MoE
(layers/moe.py GroupedTopkMoEBlock: routed experts + shared experts added without a gate). The first
`first_k_dense_replace` layers are dense MLPs.

Routing follows transformers 5 (the oracle of the tests):
  V2: softmax scores, topk_method greedy or group_limited_greedy (groups scored by their best expert), weights
      times routed_scaling_factor; transformers ignores norm_topk_prob for V2 (the released V2 models set it off).
  V3: sigmoid scores + e_score_correction_bias for the choice (noaux_tc: groups scored by their best two),
      weights renormalized per norm_topk_prob, times routed_scaling_factor.
V2 rotates its rope dims in interleaved pairs; V3 when rope_interleave (the default). A V3 checkpoint's
multi-token-prediction layers (model.layers.N for N >= num_hidden_layers) are not loaded.

GGUF: llama.cpp's arch "deepseek2" holds V2, V2-Lite and V3 (deepseek_gguf.py reads its metadata: sigmoid gating
makes it a V3). Not supported: tensor parallelism, kv_eviction="streaming".
"""
from __future__ import annotations

import re
from typing import Any, Callable, ClassVar, Optional

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.model.decoder import CausalLM, DecoderLayer
from tokenmill.model.deepseek_gguf import GGUF_DEEPSEEK2_BLOCK, GGUF_DEEPSEEK2_RULES, deepseek2_gguf_kwargs
from tokenmill.model.layers.attention import Attention
from tokenmill.model.layers.linear import ShardId
from tokenmill.model.layers.mla import MLAttention
from tokenmill.model.layers.mlp import GatedMLP
from tokenmill.model.layers.moe import EXPERT_RULES, GroupedTopkMoEBlock

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class _DeepseekForCausalLM(CausalLM):
    # gate|up packing only: an MLA checkpoint's q_proj is not a q|k|v shard
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    checkpoint_rules = (
        (r"(.*)\.mlp\.shared_experts\.gate_proj\.weight", r"\1.mlp.shared_expert.gate_up_proj.weight", lambda m: 0),
        (r"(.*)\.mlp\.shared_experts\.up_proj\.weight", r"\1.mlp.shared_expert.gate_up_proj.weight", lambda m: 1),
        (r"(.*)\.mlp\.shared_experts\.down_proj\.weight", r"\1.mlp.shared_expert.down_proj.weight", None),
    ) + GGUF_DEEPSEEK2_RULES + EXPERT_RULES
    gguf_block_names = GGUF_DEEPSEEK2_BLOCK
    latent_kv_cache = True
    interleaved_rope: ClassVar[bool] = True

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        act = getattr(config, "hidden_act", "silu")
        if getattr(config, "mlp_bias", False):
            raise ModelLoadError("DeepSeek MLPs with mlp_bias are not supported")
        if (getattr(config, "moe_layer_freq", 1) or 1) != 1:
            raise ModelLoadError(f"moe_layer_freq {config.moe_layer_freq} is not supported (only 1, every layer from "
                                 "first_k_dense_replace on a MoE, as transformers builds it)")
        attn = MLAttention(config, dtype, interleaved_rope=self.rope_interleaved(config))
        if layer_idx < (config.first_k_dense_replace or 0):
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype, hidden_act=act)
        else:
            try:
                mlp = GroupedTopkMoEBlock(
                    config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
                    config.moe_intermediate_size, dtype, **self.routing(config), hidden_act=act,
                    shared_intermediate_size=config.moe_intermediate_size * (config.n_shared_experts or 0))
            except ValueError as e:
                raise ModelLoadError(f"DeepSeek routing: {e}") from None
        return DecoderLayer(config, attn, mlp, dtype)

    @classmethod
    def rope_interleaved(cls, config: Any) -> bool:
        return cls.interleaved_rope

    @classmethod
    def routing(cls, config: Any) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def gguf_config_kwargs(cls, meta: Callable[[str], Any]) -> dict[str, Any]:
        return deepseek2_gguf_kwargs(meta)

    @classmethod
    def gguf_variant(cls, meta: Callable[[str], Any]) -> Optional[tuple[str, str]]:
        """A deepseek2 file with sigmoid gating is a V3 (llama.cpp: expert_gating_func 2)."""
        gating = meta("expert_gating_func")
        return ("deepseek_v3", "DeepseekV3ForCausalLM") if gating is not None and int(gating) == 2 else None

    def attention_layers(self) -> list[Attention]:
        return []  # MLA computes its own attention over the latent cache: no backend to swap

    def map_weight_name(self, name: str) -> Optional[tuple[str, ShardId]]:
        m = _LAYER.match(name)
        if m is not None and int(m[1]) >= self.config.num_hidden_layers:
            return None  # V3's multi-token-prediction layer(s)
        return super().map_weight_name(name)


class DeepseekV2ForCausalLM(_DeepseekForCausalLM):
    @classmethod
    def routing(cls, config: Any) -> dict[str, Any]:
        method = getattr(config, "topk_method", None) or "greedy"
        if method == "greedy":
            groups = topk_groups = 1
        elif method == "group_limited_greedy":
            groups, topk_groups = config.n_group, config.topk_group
            if not groups or not topk_groups:
                raise ModelLoadError("topk_method group_limited_greedy needs n_group and topk_group")
        else:
            raise ModelLoadError(f"unsupported DeepSeek-V2 topk_method {method!r} (greedy, group_limited_greedy)")
        return dict(scoring="softmax", num_groups=groups, topk_groups=topk_groups, group_score="max",
                    renormalize=False, scaling_factor=float(config.routed_scaling_factor))


class DeepseekV3ForCausalLM(_DeepseekForCausalLM):
    @classmethod
    def rope_interleaved(cls, config: Any) -> bool:
        return bool(getattr(config, "rope_interleave", True))

    @classmethod
    def routing(cls, config: Any) -> dict[str, Any]:
        groups = config.n_group or 1
        return dict(scoring="sigmoid", num_groups=groups, topk_groups=config.topk_group or groups,
                    group_score="top2", renormalize=bool(config.norm_topk_prob),
                    scaling_factor=float(config.routed_scaling_factor))
