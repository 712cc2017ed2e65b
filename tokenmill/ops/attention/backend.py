"""Attention backends: the pluggable part of the Attention layer.

A backend stores this step's K/V in the layer's paged cache and attends over it. The model's Attention
layers call `backend.forward(q, k, v, kv_cache, batch, scale, sliding_window)`; a fast (Triton) backend is
swapped in from outside with `model.set_attention_backend(backend)`.
Backends: reference (PyTorch), cpu (compiled C kernel, tokenmill/ops/cpu), triton (GPU).
"""
from __future__ import annotations

from typing import Optional, Protocol, Union

import torch

from tokenmill.ops.attention.kv_quant import (QuantizedKVCache, compact_dequantized, quantized_paged_attention,
                                              write_kv_quantized)
from tokenmill.ops.attention.reference import paged_attention, write_kv
from tokenmill.ops.cpu.attention import (cpu_paged_attention, cpu_prefill_attention, gather_kv_bf16,
                                         prefill_kernel_supports, supports_kv_dtype)
from tokenmill.worker.forward_batch import ForwardBatch, select_requests

# prefill chunks of at least this many query tokens may run in prefill_dtype (see CpuAttentionBackend)
PREFILL_MIN_TOKENS = 64


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

    int8 / fp8 caches (QuantizedKVCache) are quantized on write by the PyTorch code (write_kv_quantized; the fused C
    layer writes int8 itself) and read by the kernel with their scales in place; KV dtypes the kernel cannot read
    keep the reference path.
    With prefill_dtype (bfloat16 when the model's packed linears run their large GEMMs in bf16: AMX /
    AVX512-BF16 CPUs), requests with a prefill chunk of >= PREFILL_MIN_TOKENS queries attend in bf16: through
    the prefill kernel (csrc/attention_prefill.c: bf16 products over the paged cache, float32 softmax; AMX tiles, or
    vdpbf16ps without AMX) where `prefill_kernel_supports` the cache, else PyTorch's SDPA (the reference path on a
    bf16 copy of q and the gathered K/V). One SmolLM2 layer, bf16 cache, 2 threads (p50): 10 x 200-token prompts
    6.2 ms SDPA, 4.6 float32 kernel, 1.25 AMX kernel; one 2000-token prompt 12.2 / 35.9 / 5.4 (AMX Xeon,
    bench/results/s21/README.md, "#26 prefill attention"); on the Zen 4 box (no AMX) 10 x 200 12.8 / 5.3 / 2.6
    vdpbf16ps kernel, 2000 tokens 43.7 / 40.2 / 15.4 (bench/results/s23/README.md, "cattn").
    The other requests of the step stay on the float32 kernel.
    """

    name = "cpu"

    def __init__(self, prefill_dtype: Optional[torch.dtype] = None):
        self.prefill_dtype = prefill_dtype

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        if isinstance(kv_cache, QuantizedKVCache):
            write_kv_quantized(kv_cache, k, v, batch.slot_mapping)
        else:
            write_kv(kv_cache, k, v, batch.slot_mapping)
        return self.attend(q, kv_cache, batch, scale, sliding_window)

    def attend(self, q: torch.Tensor, kv_cache: Union[torch.Tensor, QuantizedKVCache], batch: ForwardBatch,
               scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        """The attention of `forward` over a cache that already holds this step's K/V."""
        quantized = isinstance(kv_cache, QuantizedKVCache)
        if not supports_kv_dtype(kv_cache.data.dtype if quantized else kv_cache.dtype):
            reference = quantized_paged_attention if quantized else paged_attention
            return reference(q, kv_cache, batch, scale, sliding_window)
        if (self.prefill_dtype is not None and self.prefill_dtype != q.dtype
                and batch.max_query_len >= PREFILL_MIN_TOKENS):
            return self._split(q, kv_cache, batch, scale, sliding_window)
        return cpu_paged_attention(q, kv_cache, batch, scale, sliding_window)  # [T, H, D]

    def _split(self, q: torch.Tensor, kv_cache: Union[torch.Tensor, QuantizedKVCache], batch: ForwardBatch,
               scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        """Long prefill chunks through SDPA in prefill_dtype, the rest of the step through the kernel. A quantized
        cache: the blocks the long chunks read are dequantized into a compact cache in prefill_dtype first (the prefill
        kernel and SDPA read plain caches), the rest of the step reads the quantized cache in place."""
        parts = batch.memo.get("prefill_split")
        if parts is None:  # the same for every layer of the step
            long = [i for i, n in enumerate(batch.query_lens_cpu) if n >= PREFILL_MIN_TOKENS]
            rest = [i for i, n in enumerate(batch.query_lens_cpu) if n < PREFILL_MIN_TOKENS]
            parts = batch.memo["prefill_split"] = (_as_slice(*select_requests(batch, long)),
                                                   _as_slice(*select_requests(batch, rest)) if rest else None)
        (sub, tok), short = parts
        plain = kv_cache
        if isinstance(kv_cache, QuantizedKVCache):
            plain, sub = compact_dequantized(kv_cache, sub, self.prefill_dtype)
        if self.prefill_dtype == torch.bfloat16 and prefill_kernel_supports(plain.dtype, q.shape[-1]):
            att = cpu_prefill_attention(q[tok], plain, sub, scale, sliding_window)
        else:
            to_bf16 = self.prefill_dtype == torch.bfloat16 and plain.dtype == torch.float32
            gather = gather_kv_bf16 if to_bf16 else None
            att = paged_attention(q[tok].to(self.prefill_dtype), plain, sub, scale, sliding_window, gather)
        if short is None and tok == slice(0, q.shape[0]):
            return att.to(q.dtype)  # a step of long chunks only: no scatter into a second buffer
        out = torch.empty_like(q)
        out[tok] = att.to(q.dtype)
        if short is not None:
            sub, tok = short
            out[tok] = cpu_paged_attention(q[tok], kv_cache, sub, scale, sliding_window)
        return out


def _as_slice(sub: ForwardBatch, tok: torch.Tensor) -> tuple[ForwardBatch, Union[slice, torch.Tensor]]:
    """(sub, tok) with tok as a slice where the selected tokens are one contiguous run (the usual case: a step's
    prefill chunks, or its decodes, sit together), so q[tok] and out[tok] = ... are views and copies, not
    gathers and scatters."""
    n = tok.numel()
    if n and int(tok[-1]) - int(tok[0]) == n - 1:
        return sub, slice(int(tok[0]), int(tok[0]) + n)
    return sub, tok
