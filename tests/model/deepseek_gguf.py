"""Write a transformers DeepSeek-V2 / V3 model as a llama.cpp "deepseek2" GGUF file with the gguf package, in the
layout llama.cpp's own convert_hf_to_gguf.py writes (llama-cpp-python 0.3.36's converter, checked tensor by tensor
and key by key on the tiny models: bench/results/s22/dsgguf_layout_check.py).

The converter cannot run in CI (not a dependency, and it needs a tokenizer); this mirrors it:
- metadata: MLA sizes (kv_lora_rank, q_lora_rank when set, key_length = kv_lora_rank + rope, value_length =
  kv_lora_rank, key_length_mla / value_length_mla the per-head sizes, head_count_kv 1), experts (count, used,
  shared, groups, expert_weights_scale, expert_weights_norm only when true, expert_gating_func from the config's
  scoring_func), leading_dense_block_count, rope.dimension_count, YaRN fields with yarn_log_multiplier =
  0.1 * mscale_all_dim;
- tensors: no permutation, kv_b_proj split per head into attn_k_b [H, R, nope] (transposed) and attn_v_b
  [H, v, R], experts as 3-D ffn_*_exps, shared experts as ffn_*_shexp, V3's correction bias as exp_probs_b.bias.
legacy=True writes the older layout instead: one attn_kv_b and the per-head sizes in key_length / value_length.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

_ATTN = {
    "q_proj": "attn_q", "q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b",
    "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm", "o_proj": "attn_output",
}
_MLP = {
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "gate": "ffn_gate_inp",
    "shared_experts.gate_proj": "ffn_gate_shexp", "shared_experts.up_proj": "ffn_up_shexp",
    "shared_experts.down_proj": "ffn_down_shexp",
}


def scoring_func(cfg: Any) -> str | None:
    """The config's scoring_func; transformers' DeepseekV3Config drops it, the released V3 config.json says sigmoid."""
    return getattr(cfg, "scoring_func", None) or ("sigmoid" if cfg.model_type == "deepseek_v3" else None)


def deepseek2_tensors(model: Any, legacy: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in numpy order) of a transformers DeepSeek model, as the converter writes them."""
    cfg = model.config
    h, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for name, p in model.state_dict().items():
        arr = p.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                yield "output.weight", arr
            continue
        if name == "model.embed_tokens.weight":
            yield "token_embd.weight", arr
            continue
        if name == "model.norm.weight":
            yield "output_norm.weight", arr
            continue
        _, _, idx, rest = name.split(".", 3)
        if int(idx) >= cfg.num_hidden_layers:
            continue  # multi-token-prediction layers: the converter skips them
        blk = f"blk.{idx}"
        if rest == "input_layernorm.weight":
            yield f"{blk}.attn_norm.weight", arr
        elif rest == "post_attention_layernorm.weight":
            yield f"{blk}.ffn_norm.weight", arr
        elif rest == "self_attn.kv_b_proj.weight":
            if legacy:
                yield f"{blk}.attn_kv_b.weight", arr
            else:
                kv_b = arr.reshape(h, nope + v, -1)  # [H, nope + v, R]
                yield f"{blk}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
                yield f"{blk}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:])
        elif rest.startswith("self_attn."):
            module = rest[len("self_attn."):].rsplit(".", 1)[0]
            yield f"{blk}.{_ATTN[module]}.weight", arr
        elif rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]
            half = arr.shape[1] // 2
            yield f"{blk}.ffn_gate_exps.weight", np.ascontiguousarray(arr[:, :half])
            yield f"{blk}.ffn_up_exps.weight", np.ascontiguousarray(arr[:, half:])
        elif rest == "mlp.experts.down_proj":  # [E, H, I]
            yield f"{blk}.ffn_down_exps.weight", arr
        elif rest == "mlp.gate.e_score_correction_bias":
            yield f"{blk}.exp_probs_b.bias", arr
        else:
            module = rest[len("mlp."):].rsplit(".", 1)[0]
            yield f"{blk}.{_MLP[module]}.weight", arr


def write_deepseek2_metadata(w: Any, cfg: Any, legacy: bool = False) -> None:
    """The deepseek2.* keys the converter writes for a transformers DeepSeek config, in its order."""
    import gguf

    rope = cfg.rope_parameters
    r, rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if getattr(cfg, "n_group", None) is not None:
        w.add_expert_group_count(cfg.n_group)
    if getattr(cfg, "topk_group", None) is not None:
        w.add_expert_group_used_count(cfg.topk_group)
    score = scoring_func(cfg)
    if score is not None:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if score == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
    if legacy:  # before the split: MHA-style per-head sizes, head_count_kv = H
        w.add_head_count_kv(cfg.num_attention_heads)
        w.add_key_length(cfg.qk_nope_head_dim + rope_dim)
        w.add_value_length(cfg.v_head_dim)
    else:
        w.add_head_count_kv(1)
        w.add_key_length(r + rope_dim)
        w.add_value_length(r)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace or 0)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(r)
    if not legacy:
        w.add_key_length_mla(cfg.qk_nope_head_dim + rope_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts or 0)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if getattr(cfg, "norm_topk_prob", None):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope_dim)
    if rope.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def save_deepseek2_gguf(model: Any, path: str, qtypes: dict[str, Any] | None = None, legacy: bool = False,
                        metadata_only: bool = False) -> str:
    """Write the model (a transformers DeepSeek model, or only its config with metadata_only) as a deepseek2 GGUF
    file, F32 unless qtypes (GGUF tensor name -> gguf.GGMLQuantizationType) says otherwise; no tokenizer (the tests
    pass one)."""
    import gguf

    from tests.model.tiny_models import finish_gguf

    w = gguf.GGUFWriter(path, "deepseek2")
    write_deepseek2_metadata(w, model if metadata_only else model.config, legacy)
    finish_gguf(w, [] if metadata_only else deepseek2_tensors(model, legacy), qtypes)
    return path
