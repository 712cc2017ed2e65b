"""Attention over the paged KV cache; the math is delegated to a pluggable backend."""
from __future__ import annotations

from typing import Optional

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
