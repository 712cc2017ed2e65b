"""Hugging Face `architectures` name -> our model class (one file per family under tokenmill/model/)."""
from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.mixtral import MixtralForCausalLM
from tokenmill.model.olmoe import OlmoeForCausalLM
from tokenmill.model.qwen2 import Qwen2ForCausalLM
from tokenmill.model.qwen2_moe import Qwen2MoeForCausalLM
from tokenmill.model.qwen3 import Qwen3ForCausalLM
from tokenmill.model.qwen3_moe import Qwen3MoeForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}

# configs without `architectures` (built in code) fall back on their model_type
_BY_MODEL_TYPE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

# GGUF general.architecture (+ whether the file has experts) -> (transformers model_type, architectures entry)
_GGUF: dict[tuple[str, bool], tuple[str, str]] = {
    ("llama", False): ("llama", "LlamaForCausalLM"),
    ("mistral", False): ("mistral", "MistralForCausalLM"),
    ("qwen2", False): ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", False): ("qwen3", "Qwen3ForCausalLM"),
    ("llama", True): ("mixtral", "MixtralForCausalLM"),
    ("qwen2moe", True): ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3moe", True): ("qwen3_moe", "Qwen3MoeForCausalLM"),
    ("olmoe", True): ("olmoe", "OlmoeForCausalLM"),
    ("deepseek2", True): ("deepseek_v2", "DeepseekV2ForCausalLM"),  # V3 with sigmoid gating (gguf_variant)
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def supported_gguf_architectures() -> list[str]:
    return sorted({arch for arch, _ in _GGUF})


def gguf_architecture(arch: str, has_experts: bool) -> tuple[str, str, type[nn.Module]]:
    """(model_type, HF architecture, our class) for a GGUF general.architecture; ModelLoadError if unsupported."""
    entry = _GGUF.get((arch, has_experts))
    if entry is None:
        kind = "mixture-of-experts " if has_experts else ""
        raise ModelLoadError(f"unsupported {kind}GGUF architecture {arch!r}; supported: "
                             f"{', '.join(supported_gguf_architectures())}")
    return entry[0], entry[1], _MODELS[entry[1]]


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
