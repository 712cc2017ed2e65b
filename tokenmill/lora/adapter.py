"""Reading a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) and checking it against what
the served model and the engine's buffers can take. Every refusal is an InvalidRequestError naming `param`.

The weights come back as plain float32 tensors per (layer, target): A [r, in], B [out, r] with the adapter's
scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) folded into B, so that a target's output
gains x @ A^T @ B^T, what PEFT's merged weight W + scaling * B @ A computes.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.lora.config import LORA_TARGETS

_TENSOR = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                     r"(?:\.default)?\.weight")
# adapter_config.json fields that would change the math: refused unless they hold their no-op value
_NOOP_FIELDS = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, []),
                "rank_pattern": ({}, None), "alpha_pattern": ({}, None)}


@dataclass
class LoRAWeights:
    """One adapter, ready for the runner: (layer, target) -> (A [r, in], B [out, r] scaled)."""

    name: str
    rank: int
    targets: tuple[str, ...]
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


def target_shapes_of(model: Any) -> Optional[dict[str, Any]]:
    """What LoRA can attach to in `model`: {"num_layers": L, "targets": {target: (in, out)}} over the targets every
    layer has as plain linears (attention q/k/v/o; gate/up/down where the MLP is dense); None: nothing."""
    from tokenmill.model.layers.attention import SelfAttention
    from tokenmill.model.layers.mlp import GatedMLP

    layers = list(getattr(getattr(model, "model", None), "layers", []))
    if not layers or not all(isinstance(getattr(l, "self_attn", None), SelfAttention) for l in layers):
        return None
    a = layers[0].self_attn
    hidden = a.qkv_proj.in_features
    targets = {"q_proj": (hidden, a.q_size), "k_proj": (hidden, a.kv_size), "v_proj": (hidden, a.kv_size),
               "o_proj": (a.q_size, a.o_proj.out_features)}
    if all(isinstance(getattr(l, "mlp", None), GatedMLP) for l in layers):
        inter = layers[0].mlp.down_proj.in_features
        targets.update(gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
    return {"num_layers": len(layers), "targets": targets}


def read_adapter(name: str, path: str, shapes: dict[str, Any], max_rank: int) -> LoRAWeights:
    """Read and check the PEFT folder at `path` against the model's target shapes and the engine's max rank."""
    if not os.path.isdir(path):
        raise InvalidRequestError(f"LoRA adapter folder not found: {path}", param="lora_path")
    cfg_file = os.path.join(path, "adapter_config.json")
    st_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(cfg_file):
        raise InvalidRequestError(f"{path} has no adapter_config.json (not a PEFT adapter folder)", param="lora_path")
    if not os.path.isfile(st_file):
        raise InvalidRequestError(f"{path} has no adapter_model.safetensors (only the safetensors format is "
                                  "read)", param="lora_path")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"cannot read {cfg_file}: {e}", param="lora_path") from None
    rank, scaling = _rank_and_scaling(cfg, max_rank)
    from safetensors import safe_open

    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(st_file, framework="pt") as f:
            for key in f.keys():
                m = _TENSOR.fullmatch(key)
                if m is None:
                    raise InvalidRequestError(f"adapter tensor {key!r} is not a LoRA A/B matrix of a q/k/v/o/gate/"
                                              "up/down projection", param="lora_path")
                layer, target, ab = int(m.group(1)), m.group(2), m.group(3)
                found.setdefault((layer, target), {})[ab] = f.get_tensor(key).to(torch.float32)
    except InvalidRequestError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file
        raise InvalidRequestError(f"cannot read {st_file}: {e}", param="lora_path") from None
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    num_layers, allowed = shapes["num_layers"], shapes["targets"]
    for (layer, target), ab in sorted(found.items()):
        if target not in LORA_TARGETS:
            raise InvalidRequestError(f"adapter targets {target!r}; supported: {', '.join(LORA_TARGETS)}",
                                      param="lora_path")
        if target not in allowed:
            raise InvalidRequestError(f"adapter targets {target!r}, which this model's layers do not have as a "
                                      f"plain linear (supported here: {', '.join(allowed)})", param="lora_path")
        if layer >= num_layers:
            raise InvalidRequestError(f"adapter has layer {layer}; the model has {num_layers}", param="lora_path")
        if set(ab) != {"A", "B"}:
            raise InvalidRequestError(f"adapter has lora_{''.join(ab)} but not both A and B for layer {layer} "
                                      f"{target}", param="lora_path")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = allowed[target]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise InvalidRequestError(f"adapter {target} of layer {layer} has A {tuple(a.shape)}, B {tuple(b.shape)};"
                                      f" expected A ({rank}, {fan_in}), B ({fan_out}, {rank}) for this model",
                                      param="lora_path")
        tensors[(layer, target)] = (a.contiguous(), (b * scaling).contiguous())
    if not tensors:
        raise InvalidRequestError(f"adapter at {path} has no LoRA tensors", param="lora_path")
    targets = tuple(t for t in LORA_TARGETS if any(k[1] == t for k in tensors))
    return LoRAWeights(name, rank, targets, tensors)


def _rank_and_scaling(cfg: dict, max_rank: int) -> tuple[int, float]:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidRequestError(f"adapter peft_type is {cfg.get('peft_type')!r}; only LORA is served",
                                  param="lora_path")
    for key, ok in _NOOP_FIELDS.items():
        if key in cfg and cfg[key] not in ok:
            raise InvalidRequestError(f"adapter_config.json sets {key}={cfg[key]!r}, which is not supported",
                                      param="lora_path")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidRequestError(f"adapter_config.json has no valid rank r (got {rank!r})", param="lora_path")
    if rank > max_rank:
        raise InvalidRequestError(f"adapter rank {rank} exceeds the server's max_lora_rank {max_rank}",
                                  param="lora_path")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InvalidRequestError(f"adapter lora_alpha must be a number, got {alpha!r}", param="lora_path")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return rank, float(scaling)
