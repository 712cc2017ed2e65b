"""PEFT adapters made in the test on tiny random models (peft is the oracle: its merged model is the reference)."""
from __future__ import annotations

import copy
from typing import Any

import torch

from tests.model.tiny_models import build_tiny_model


@torch.no_grad()
def make_adapter(arch: str, path: str, rank: int, targets: list[str], seed: int, alpha: float = 16.0,
                 rslora: bool = False) -> Any:
    """Save a LoRA adapter with random A and B (B is zero at PEFT's init, which would hide every bug) for the tiny
    `arch` model at `path`; returns the merged transformers model (the oracle)."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(arch)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                     task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(path)
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def write_random_adapter(path: str, shapes: dict, rank: int, targets: list[str], seed: int, std: float = 0.05,
                         alpha: float = 16.0) -> None:
    """A PEFT folder written directly (no peft): random A and B for `targets` of every layer, for models whose
    transformers twin is not at hand (the bundled GGUF). shapes: tokenmill.lora.adapter.target_shapes_of(model)."""
    import json
    import os

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes["num_layers"]):
        for t in targets:
            fan_in, fan_out = shapes["targets"][t]
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * std
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none"}, f)
