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
