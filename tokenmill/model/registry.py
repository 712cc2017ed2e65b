"""Hugging Face `architectures` name -> our model class."""
from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.llama import LlamaForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

# configs without `architectures` (built in code) fall back on their model_type
_BY_MODEL_TYPE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(config: Any) -> type[nn.Module]:
    """The class for a transformers config (by its first supported `architectures` entry)."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs and getattr(config, "model_type", None) in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[config.model_type]]
    for arch in archs:
        if arch in _MODELS:
            return _MODELS[arch]
    name = ", ".join(archs) if archs else f"<none> (model_type {getattr(config, 'model_type', None)!r})"
    raise ModelLoadError(f"unsupported architecture {name}; supported: {', '.join(supported_architectures())}")
