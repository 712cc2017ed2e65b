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
