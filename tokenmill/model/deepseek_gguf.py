"""llama.cpp's GGUF arch "deepseek2" (DeepSeek-V2, V2-Lite, V3 and their fine-tunes): metadata -> the transformers
DeepSeek config, tensor names -> checkpoint names (deepseek.py uses both).

The layout, as llama.cpp's convert_hf_to_gguf.py writes it (checked against the converter of llama-cpp-python
0.3.36 on tiny random V2 / V2-Lite / V3 checkpoints):
- no row permutation: llama.cpp runs deepseek2's rope on interleaved pairs, DeepSeek's own layout;
- kv_b_proj split per head into attn_k_b [H, kv_lora_rank, nope] (W_UK transposed) and attn_v_b
  [H, v_head_dim, kv_lora_rank], with attention.key_length_mla / value_length_mla the per-head q/k and v sizes
  (attention.key_length / value_length are then kv_lora_rank + rope and kv_lora_rank, and head_count_kv is 1).
  Older files keep one attn_kv_b [H * (nope + v), kv_lora_rank] and put the per-head sizes in key_length /
  value_length;
- experts as 3-D ffn_{gate,up,down}_exps, shared experts fused into ffn_*_shexp (n_shared * moe_intermediate
  rows), the router ffn_gate_inp kept F32, V3's e_score_correction_bias as exp_probs_b.bias;
- routing: expert_gating_func 1 softmax (also when absent: llama.cpp's default for old V2 files) or 2 sigmoid
  (V3), expert_weights_scale = routed_scaling_factor, expert_weights_norm = norm_topk_prob (written only when true),
  expert_group_count / expert_group_used_count = n_group / topk_group;
- YaRN: rope.scaling.* with yarn_log_multiplier = 0.1 * mscale_all_dim (mscale itself is not written: llama.cpp
  assumes mscale == mscale_all_dim, as in every released DeepSeek config).
Softmax files load as DeepseekV2ForCausalLM (groups scored by their best expert, transformers' V2
group_limited_greedy; llama.cpp scores groups by their best two for V2 too), sigmoid files as
DeepseekV3ForCausalLM (noaux_tc).
"""
from __future__ import annotations

from typing import Any, Callable

from tokenmill.errors import ModelLoadError
from tokenmill.model.layers.moe import GGUF_MOE_BLOCK

GGUF_DEEPSEEK2_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",  # -> kv_b_proj shard "k_b" (GGUF_DEEPSEEK2_RULES)
    "attn_v_b": "self_attn.v_b_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",  # the leading dense layers
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    **GGUF_MOE_BLOCK,
    "exp_probs_b": "mlp.gate.e_score_correction",  # .bias
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # our module's name: packs into its gate_up_proj
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
GGUF_DEEPSEEK2_RULES = (
    (r"(.*)\.self_attn\.k_b_proj\.weight", r"\1.self_attn.kv_b_proj.weight", lambda m: "k_b"),
    (r"(.*)\.self_attn\.v_b_proj\.weight", r"\1.self_attn.kv_b_proj.weight", lambda m: "v_b"),
    (r"(.*)\.mlp\.gate\.e_score_correction\.bias", r"\1.mlp.gate.e_score_correction_bias", None),
)
GATING_SOFTMAX, GATING_SIGMOID = 1, 2  # llama.cpp's expert_gating_func values


def deepseek2_gguf_kwargs(meta: Callable[[str], Any]) -> dict[str, Any]:
    """The DeepSeek config fields of a deepseek2 GGUF file (meta(key) reads `deepseek2.<key>`)."""

    def need(key: str) -> Any:
        value = meta(key)
        if value is None:
            raise ModelLoadError(f"deepseek2 GGUF file lacks metadata deepseek2.{key}")
        return value

    heads, rope = int(need("attention.head_count")), int(need("rope.dimension_count"))
    if meta("attention.key_length_mla") is not None:  # split attn_k_b / attn_v_b files
        qk, v_dim = int(meta("attention.key_length_mla")), int(need("attention.value_length_mla"))
    else:  # older files (one attn_kv_b): the per-head sizes in key_length / value_length
        qk, v_dim = int(need("attention.key_length")), int(need("attention.value_length"))
    if qk <= rope:
        raise ModelLoadError(f"deepseek2 GGUF: q/k head size {qk} must exceed the rope dims {rope}")
    gating = meta("expert_gating_func")
    gating = GATING_SOFTMAX if gating is None else int(gating)
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise ModelLoadError(f"unsupported expert gating function {gating} in a deepseek2 GGUF file (1 softmax: "
                             "DeepSeek-V2, 2 sigmoid: DeepSeek-V3)")
    groups = int(meta("expert_group_count") or 1)
    norm = bool(meta("expert_weights_norm") or False)
    q_rank = meta("attention.q_lora_rank")
    kwargs: dict[str, Any] = dict(
        num_key_value_heads=heads,  # the file says 1 (MLA as MQA); transformers' DeepSeek configs keep H
        head_dim=rope,  # what transformers sets: the rotary size
        q_lora_rank=int(q_rank) if q_rank else None,
        kv_lora_rank=int(need("attention.kv_lora_rank")),
        qk_nope_head_dim=qk - rope, qk_rope_head_dim=rope, v_head_dim=v_dim,
        n_routed_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
        n_shared_experts=int(meta("expert_shared_count") or 0),
        moe_intermediate_size=int(need("expert_feed_forward_length")),
        first_k_dense_replace=int(meta("leading_dense_block_count") or 0),
        routed_scaling_factor=float(meta("expert_weights_scale") or 1.0),
        n_group=groups, topk_group=int(meta("expert_group_used_count") or groups), norm_topk_prob=norm,
    )
    if gating == GATING_SOFTMAX:
        if norm:
            raise ModelLoadError("deepseek2 GGUF with softmax gating and expert_weights_norm is not supported "
                                 "(transformers' DeepSeek-V2 never renormalizes the top-k weights)")
        kwargs["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    else:
        kwargs.update(topk_method="noaux_tc", rope_interleave=True)  # llama.cpp ropes deepseek2 in pairs
    scaling = meta("rope.scaling.type")
    if scaling == "yarn":
        kwargs["rope_scaling"] = _yarn(meta, need)
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"unsupported rope scaling {scaling!r} in a deepseek2 GGUF file (yarn or none)")
    return kwargs


def _yarn(meta: Callable[[str], Any], need: Callable[[str], Any]) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "yarn", "factor": float(need("rope.scaling.factor")),
                            "original_max_position_embeddings": int(need("rope.scaling.original_context_length"))}
    for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if meta(f"rope.scaling.{key}") is not None:
            rope[ours] = float(meta(f"rope.scaling.{key}"))
    attn_factor = meta("rope.scaling.yarn_attn_factor")
    if attn_factor is not None and float(attn_factor) != 1.0:
        raise ModelLoadError(f"deepseek2 GGUF: rope.scaling.yarn_attn_factor {float(attn_factor)} is not supported "
                             "(DeepSeek's YaRN scales by mscale / mscale_all_dim)")
    log_mul = meta("rope.scaling.yarn_log_multiplier")
    if log_mul:  # the converter writes 0.1 * mscale_all_dim
        rope["mscale"] = rope["mscale_all_dim"] = float(log_mul) / 0.1
    return rope
