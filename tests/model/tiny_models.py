"""Tiny random-weight Hugging Face models of real configs, saved with save_pretrained (reusable by other tests).

Weights are drawn larger than the usual init (std 0.1, norms 1 +- 0.1, random biases) so that attention is
sharp and position, norm or bias mistakes show in the logits.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

VOCAB = 512


def _llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        architectures=["LlamaForCausalLM"])


def _qwen2_config() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, architectures=["Qwen2ForCausalLM"])


def _llama_mqa_config() -> Any:
    """One KV head (fewer than tensor-parallel ranks), tied embeddings, an odd vocabulary (padded when split)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB - 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])


def _mistral_config() -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        sliding_window=8, rope_theta=10000.0, head_dim=16, bos_token_id=1, eos_token_id=2,
        architectures=["MistralForCausalLM"])


def _qwen3_config() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=1, eos_token_id=2,
        architectures=["Qwen3ForCausalLM"])


def _mixtral_config() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, num_local_experts=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
        architectures=["MixtralForCausalLM"])


def _qwen2_moe_config() -> Any:
    """A shared expert, norm_topk_prob off, layer 0 dense (mlp_only_layers)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0,
        bos_token_id=1, eos_token_id=2, architectures=["Qwen2MoeForCausalLM"])


def _qwen3_moe_config() -> Any:
    """norm_topk_prob on; top-k = number of experts on this tiny config would hide routing bugs, so 2 of 8."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, architectures=["Qwen3MoeForCausalLM"])


def _olmoe_config() -> Any:
    """q/k norm over the whole projection, clip_qkv, norm_topk_prob off."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=2.0,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["OlmoeForCausalLM"])


def _deepseek_v2_config() -> Any:
    """MLA with q_lora_rank, YaRN rope scaling (mscale_all_dim: the softmax scale changes too), layer 0 dense,
    group_limited_greedy routing (2 of 4 groups), 2 shared experts, routed_scaling_factor."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 128},
        bos_token_id=1, eos_token_id=2, architectures=["DeepseekV2ForCausalLM"])


def _deepseek_v2_lite_config() -> Any:
    """V2-Lite's shape: no q_lora_rank (a plain q_proj), greedy routing, one shared expert, default rope, no
    dense layer."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=0, topk_method="greedy", routed_scaling_factor=1.0, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        architectures=["DeepseekV2ForCausalLM"])


def _deepseek_v3_config() -> Any:
    """Sigmoid scores + e_score_correction_bias (random, see build_tiny_model), noaux_tc grouped top-k (2 of 4
    groups by their best two), norm_topk_prob, routed_scaling_factor 2.5, interleaved rope, layer 0 dense."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
        rope_interleave=True, bos_token_id=0, eos_token_id=1, architectures=["DeepseekV3ForCausalLM"])


TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "mistral": _mistral_config,
    "llama_mqa": _llama_mqa_config,
    "qwen3": _qwen3_config,
    "mixtral": _mixtral_config,
    "qwen2_moe": _qwen2_moe_config,
    "qwen3_moe": _qwen3_moe_config,
    "olmoe": _olmoe_config,
    "deepseek_v2": _deepseek_v2_config,
    "deepseek_v2_lite": _deepseek_v2_lite_config,
    "deepseek_v3": _deepseek_v3_config,
}
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
DEEPSEEK_ARCHS = ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3"]


def tiny_config(name: str) -> Any:
    return TINY_CONFIGS[name]()


@torch.no_grad()
def build_tiny_model(name: str, seed: int = 0, **overrides: Any) -> Any:
    """A transformers *ForCausalLM with random fp32 weights for TINY_CONFIGS[name] (config fields overridden)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="eager")
    for pname, p in model.named_parameters():
        if "norm" in pname:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))
    for bname, b in model.named_buffers():
        if bname.endswith("e_score_correction_bias"):  # DeepSeek-V3: a bias that changes which experts win
            b.copy_(0.1 * torch.randn_like(b))
    return model.eval()


def save_tiny_model(name: str, path: str, seed: int = 0, max_shard_size: str | None = None) -> str:
    """Build and save_pretrained the tiny model into `path` (created); returns path."""
    os.makedirs(path, exist_ok=True)
    model = build_tiny_model(name, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def _smollm_config() -> Any:
    """SmolLM-like: llama arch, tied embeddings, default rope, GQA (the shape of the bundled default model)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=100000.0, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])


TINY_CONFIGS["smollm"] = _smollm_config

_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
# transformers model_type -> llama.cpp architecture (Mixtral is "llama" with experts)
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "llama", "qwen2_moe": "qwen2moe",
              "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def _llamacpp_permute(w: Any, n_head: int) -> Any:
    """What llama.cpp's convert_hf_to_gguf does to llama q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model: Any, per_expert: bool = False) -> Any:
    """(GGUF name, float32 array) of a transformers model laid out like llama.cpp's converter: q/k rows permuted
    for the llama arch, experts as 3-D ffn_{gate,up,down}_exps [E, rows, cols] (per_expert: the older layout,
    blk.N.ffn_gate.E.weight one per expert), the shared expert gate 1-D."""
    cfg = model.config
    permute = _GGUF_ARCH[cfg.model_type] == "llama"
    for name, p in model.state_dict().items():
        arr = p.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            yield "output.weight", arr
        elif name == "model.embed_tokens.weight":
            yield "token_embd.weight", arr
        elif name == "model.norm.weight":
            yield "output_norm.weight", arr
        elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]
            idx, half = name.split(".")[2], arr.shape[1] // 2
            parts = {"gate": arr[:, :half], "up": arr[:, half:]}
            for p, a in parts.items():
                if per_expert:
                    yield from ((f"blk.{idx}.ffn_{p}.{e}.weight", a[e].copy()) for e in range(a.shape[0]))
                else:
                    yield f"blk.{idx}.ffn_{p}_exps.weight", a.copy()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            idx = name.split(".")[2]
            if per_expert:
                yield from ((f"blk.{idx}.ffn_down.{e}.weight", arr[e].copy()) for e in range(arr.shape[0]))
            else:
                yield f"blk.{idx}.ffn_down_exps.weight", arr
        else:
            _, _, idx, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if permute and module == "self_attn.q_proj":
                arr = _llamacpp_permute(arr, cfg.num_attention_heads)
            elif permute and module == "self_attn.k_proj":
                arr = _llamacpp_permute(arr, cfg.num_key_value_heads)
            elif module == "mlp.shared_expert_gate":
                arr = arr.reshape(-1)
            yield f"blk.{idx}.{_GGUF_BLOCK[module]}.{kind}", arr


def save_tiny_gguf(model: Any, path: str, qtypes: dict[str, Any] | None = None, per_expert: bool = False) -> str:
    """Write a transformers model (llama, qwen2/3, mixtral, qwen2/3-moe, olmoe) as a GGUF file the way llama.cpp's
    converter lays it out, F32 unless qtypes (GGUF tensor name -> gguf.GGMLQuantizationType) says otherwise;
    per_expert: experts in the older one-tensor-per-expert layout."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(path, _GGUF_ARCH[cfg.model_type])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        if getattr(cfg, "norm_topk_prob", None) is not None:
            w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    if getattr(cfg, "clip_qkv", None):
        w.add_clamp_kqv(float(cfg.clip_qkv))
    finish_gguf(w, _gguf_tensors(model, per_expert), qtypes)
    return path


def finish_gguf(w: Any, tensors: Any, qtypes: Any = None) -> None:
    """Add (GGUF name, float32 array) tensors to a GGUFWriter, quantized where qtypes (name -> GGMLQuantizationType)
    says, then write the file and close it."""
    import gguf

    for gname, arr in tensors:
        qtype = (qtypes or {}).get(gname)
        if qtype is not None:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.no_grad()
def fake_quantize_(model: Any, substring: str, qtype: Any) -> None:
    """Round every matrix whose name contains `substring` through GGUF quantization (rows of the last dim), so
    the float model equals what a file storing those tensors as `qtype` dequantizes to (re-quantizing such values
    gives the same blocks)."""
    from gguf.quants import dequantize, quantize

    for name, p in model.named_parameters():
        if substring in name and p.dim() >= 2:
            arr = p.detach().float().numpy()
            p.copy_(torch.from_numpy(dequantize(quantize(arr, qtype), qtype).reshape(arr.shape)))
