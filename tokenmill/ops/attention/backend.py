"""Attention backends: the pluggable part of the Attention layer.

A backend stores this step's K/V in the layer's paged cache and attends over it. The model's Attention
layers call `backend.forward(q, k, v, kv_cache, batch, scale, sliding_window)`; a fast (Triton) backend is
swapped in from outside with `model.set_attention_backend(backend)`.
Backends: reference (PyTorch), cpu (compiled C kernel, tokenmill/ops/cpu), triton (GPU).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from tokenmill.ops.attention.kv_quant import QuantizedKVCache, quantized_paged_attention, write_kv_quantized
from tokenmill.ops.attention.reference import paged_attention, write_kv
from tokenmill.ops.cpu.attention import cpu_paged_attention, supports_kv_dtype
from tokenmill.worker.forward_batch import ForwardBatch


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D], kv_cache [2, num_blocks, block_size, Hkv, D] -> out [T, H, D]."""
        ...


class ReferenceAttentionBackend:
    """Pure PyTorch: write_kv then paged_attention (runs anywhere; the oracle for fast backends)."""

    name = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        if isinstance(kv_cache, QuantizedKVCache):  # int8 / fp8 cache: quantize on write, dequantize on read
            write_kv_quantized(kv_cache, k, v, batch.slot_mapping)
            return quantized_paged_attention(q, kv_cache, batch, scale, sliding_window)
        write_kv(kv_cache, k, v, batch.slot_mapping)
        return paged_attention(q, kv_cache, batch, scale, sliding_window)  # [T, H, D]


class CpuAttentionBackend:
    """Compiled C kernel (tokenmill/ops/cpu/csrc/attention.c): write_kv, then one pass over the paged cache.

    int8/fp8 caches and KV dtypes the kernel cannot read keep the reference path.
    """

    name = "cpu"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        if isinstance(kv_cache, QuantizedKVCache):
            write_kv_quantized(kv_cache, k, v, batch.slot_mapping)
            return quantized_paged_attention(q, kv_cache, batch, scale, sliding_window)
        write_kv(kv_cache, k, v, batch.slot_mapping)
        if not supports_kv_dtype(kv_cache.dtype):
            return paged_attention(q, kv_cache, batch, scale, sliding_window)
        return cpu_paged_attention(q, kv_cache, batch, scale, sliding_window)  # [T, H, D]
