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


TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "mistral": _mistral_config,
    "llama_mqa": _llama_mqa_config,
    "qwen3": _qwen3_config,
}


def tiny_config(name: str) -> Any:
    return TINY_CONFIGS[name]()


@torch.no_grad()
def build_tiny_model(name: str, seed: int = 0) -> Any:
    """A transformers *ForCausalLM with random fp32 weights for TINY_CONFIGS[name]."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="eager")
    for pname, p in model.named_parameters():
        if "norm" in pname:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))
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
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _llamacpp_permute(w: Any, n_head: int) -> Any:
    """What llama.cpp's convert_hf_to_gguf does to llama q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(model: Any, path: str, qtypes: dict[str, Any] | None = None) -> str:
    """Write a transformers llama/qwen2 model as an F32 GGUF file the way llama.cpp's converter lays it out.

    qtypes: GGUF tensor name (blk.0.attn_q.weight) -> gguf.GGMLQuantizationType to store it quantized."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, p in model.state_dict().items():
        arr = p.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, idx, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{idx}.{_GGUF_BLOCK[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                arr = _llamacpp_permute(arr, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                arr = _llamacpp_permute(arr, cfg.num_key_value_heads)
        qtype = (qtypes or {}).get(gname)
        if qtype is not None:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
