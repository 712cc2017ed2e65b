"""Attention over the paged KV cache; the math is delegated to a pluggable backend."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from tokenmill.ops.attention.backend import AttentionBackend, ReferenceAttentionBackend
from tokenmill.worker.forward_batch import ForwardBatch


class Attention(nn.Module):
    """Stores k/v of this step in `kv_cache` and attends q over each request's cached context.

    The backend is a plain attribute (not a submodule); `backend.forward` does both the K/V write and the
    attention so a fused kernel can replace them together.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None, backend: Optional[AttentionBackend] = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend: AttentionBackend = backend if backend is not None else ReferenceAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (rotary already applied) -> [T, H * D]."""
        out = self.backend.forward(q, k, v, kv_cache, batch, self.scale, self.sliding_window)  # [T, H, D]
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)  # [T, H * D]


def head_dim_of(config: Any) -> int:
    """The per-head size: config.head_dim when set, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config: Any, layer_idx: int) -> Optional[int]:
    """The window of one layer: per layer_types when the config has them (Qwen2), else config.sliding_window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window:
        return None
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class SelfAttention(nn.Module):
    """The decoder's attention block: packed q|k|v projection, optional q/k RMSNorm, rotary, paged attention, o_proj.

    qk_norm: None; "head" (Qwen3: one RMSNorm over each head's D values); "full" (OLMoE: over the whole q / k
    projection, before the split into heads). clip_qkv (OLMoE): q, k, v clamped to [-clip, clip] (after a full
    q/k norm).
    """

    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: Optional[str] = None, clip_qkv: Optional[float] = None,
                 sliding_window: Optional[int] = None):
        super().__init__()
        from tokenmill.model.layers.linear import Linear, QKVLinear
        from tokenmill.model.layers.norm import RMSNorm

        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                  bias=qkv_bias, dtype=dtype)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias, dtype=dtype)
        if qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {qk_norm!r}")
        self.qk_norm = qk_norm
        self.clip_qkv = clip_qkv
        if qk_norm is not None:
            q_dim, k_dim = (self.head_dim, self.head_dim) if qk_norm == "head" else (self.q_size, self.kv_size)
            self.q_norm = RMSNorm(q_dim, config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(k_dim, config.rms_norm_eps, dtype=dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              sliding_window=sliding_window)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        from tokenmill.model.layers.rotary import RotaryEmbedding

        t = h.shape[0]
        qkv = self.qkv_proj(h)  # [T, (H + 2 Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, _ = self.q_norm(q.contiguous())  # [T, H * D]
            k, _ = self.k_norm(k.contiguous())  # [T, Hkv * D]
        if self.clip_qkv is not None:  # after the full q/k norm, like OLMoE
            q, k, v = (x.clamp(-self.clip_qkv, self.clip_qkv) for x in (q, k, v))
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm == "head":
            q, _ = self.q_norm(q)
            k, _ = self.k_norm(k)
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        o = self.attn(q, k, v, kv_cache, batch)  # [T, H * D]
        return self.o_proj(o)  # [T, hidden]
