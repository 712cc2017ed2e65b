"""Rotary position embedding (GPT-NeoX / Llama "rotate half" layout) with Hugging Face rope scaling types.

Supported rope types: default, linear, llama3 (Llama 3.1/3.2), dynamic (NTK, fixed at the scaled maximum
length like vLLM, not re-computed per step like transformers), yarn. The inverse frequencies are computed on
the CPU in float32 exactly as transformers does, so cos/sin match it bit for bit.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from tokenmill.errors import ModelLoadError


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings of a transformers config, old (rope_theta + rope_scaling) or new (rope_parameters) style."""
    params: dict[str, Any] = {}
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params.update(legacy)
    new = getattr(config, "rope_parameters", None)
    if isinstance(new, dict):
        params.update(new)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))  # [dim/2]


def _llama3_inv_freq(base: float, dim: int, p: dict[str, Any]) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: divide
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig
    attn_factor = p.get("attention_factor")
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attn_factor is None:
        attn_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all \
            else get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor, float(attn_factor)


def compute_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32 on CPU, attention scaling of cos/sin) for a transformers config."""
    with torch.device("cpu"):  # bit-identical to transformers whatever device the model is built on
        return _compute_inv_freq(config, head_dim)


def _compute_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    p = rope_parameters(config)
    base, rope_type = float(p["rope_theta"]), p["rope_type"]
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise ModelLoadError(f"partial rotary embeddings are not supported (rotary dim {dim} of {head_dim})")
    max_pos = getattr(config, "max_position_embeddings", 2048)
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / p["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(base, dim, p), 1.0
    if rope_type == "dynamic":
        factor = p["factor"]
        seq_len = max_pos * factor
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, dim, p, max_pos)
    raise ModelLoadError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3, dynamic, yarn")


class RotaryEmbedding(nn.Module):
    """cos/sin from positions, applied to q [T, H, D] and k [T, Hkv, D]."""

    def __init__(self, config: Any, head_dim: int):
        super().__init__()
        inv_freq, self.attention_scaling = compute_inv_freq(config, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] float32

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, D] float32."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated by cos/sin [T, D]."""
        cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]  # [T, 1, D]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
        return x * cos + rotated * sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin if cos_sin is not None else self.cos_sin(positions)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)


def shift_cos_sin(inv_freq: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [D] float32 of a pure rotation by `delta` positions (no attention scaling: the cached keys
    carry it already). Rotations compose: a key rotated for position p, rotated by delta, equals the key
    rotated for p + delta. Angles in float64, so large deltas lose nothing before the cast."""
    freqs = float(delta) * inv_freq.detach().to("cpu", torch.float64)  # [D/2]
    emb = torch.cat((freqs, freqs))  # [D]
    return emb.cos().float(), emb.sin().float()


def shift_cached_keys_(kv_cache: torch.Tensor, block_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate in place the keys of whole blocks of one layer's paged cache [2, NB, BS, Hkv, D] by cos/sin [D]
    (from shift_cos_sin): the StreamingLLM / llama.cpp "K-shift" after tokens before them were evicted."""
    keys = kv_cache[0]  # [NB, BS, Hkv, D]
    k = keys.index_select(0, block_ids).float()  # [n, BS, Hkv, D]
    half = k.shape[-1] // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)  # rotate_half
    cos, sin = cos.to(k.device), sin.to(k.device)
    keys.index_copy_(0, block_ids, (k * cos + rotated * sin).to(keys.dtype))
