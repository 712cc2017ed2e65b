"""Launchers for the Triton paged-attention kernels and `TritonAttentionBackend`.

A kv_quant.QuantizedKVCache (int8 / fp8) is accepted wherever a cache tensor is: quantized on write,
read by the same kernels with the scales applied in the loop.

The backend mirrors the reference backend: `forward(q, k, v, kv_cache, batch, scale, sliding_window)`
writes this step's K/V at `batch.slot_mapping`, then attends q [T, H, D] over each request's cache and
returns [T, H, D]. Decode-only batches take the split-K (flash-decoding) kernel; any batch with a
prefill chunk takes the variable-length prefill kernel (decode rows in it are chunks of one query).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import triton

from tokenmill.ops.attention.kv_quant import QuantizedKVCache
from tokenmill.ops.attention.triton_kernels import (
    _decode_kernel,
    _decode_reduce_kernel,
    _prefill_kernel,
    _write_kv_kernel,
)
from tokenmill.worker.forward_batch import ForwardBatch

_LOG2E = 1.4426950408889634


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int]:
    """(block, offset, head) strides of one half of a [2, NB, BS, Hkv, D] cache; head_dim must be unit-stride."""
    if kv_cache.dim() != 5 or kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim] with contiguous head_dim")
    return kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def _quant_args(kv_cache) -> tuple[torch.Tensor, dict]:
    """(data tensor, extra kernel kwargs) of a plain or quantized (kv_quant.QuantizedKVCache) cache."""
    if not isinstance(kv_cache, QuantizedKVCache):
        return kv_cache, {}
    sc = kv_cache.scale
    if kv_cache.per_token_scales:  # [2, NB, BS, Hkv], head stride 1
        return kv_cache.data, dict(ks_ptr=sc[0], vs_ptr=sc[1], stride_sb=sc.stride(1), stride_so=sc.stride(2),
                                   KV_QUANT=1)
    return kv_cache.data, dict(ks_ptr=sc[0], vs_ptr=sc[1], stride_sb=0, stride_so=0, KV_QUANT=2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_out(q: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.stride(-1) != 1:
        raise ValueError("out must have a contiguous last dimension")
    return out


def triton_write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] at their flat slots of kv_cache; slots < 0 are padding and skipped."""
    t = k.shape[0]
    if t == 0:
        return
    kv_cache, qargs = _quant_args(kv_cache)
    _, _, bs, hkv, d = kv_cache.shape
    k, v = _unit_last(k), _unit_last(v)
    sb, so, sh = _cache_strides(kv_cache)
    _write_kv_kernel[(t,)](
        k, v, kv_cache[0], kv_cache[1], slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), sb, so, sh,
        NUM_KV_HEADS=hkv, HEAD_DIM=d, BLOCK_SIZE=bs, BLOCK_HKV=_pow2(hkv), BLOCK_D=_pow2(d), **qargs,
    )


def triton_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                             seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                             scale: float, sliding_window: Optional[int] = None,
                             out: Optional[torch.Tensor] = None, block_m: int = 64,
                             block_n: int = 64) -> torch.Tensor:
    """Causal attention of packed queries q [T, H, D] (chunks at the end of their sequences) -> [T, H, D]."""
    q = _unit_last(q)
    t, h, d = q.shape
    kv_cache, qargs = _quant_args(kv_cache)
    _, _, bs, hkv, _ = kv_cache.shape
    out = _empty_out(q, out)
    if t == 0 or max_query_len == 0:
        return out
    sb, so, sh = _cache_strides(kv_cache)
    block_tables = block_tables.contiguous()
    grid = (block_tables.shape[0], h, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q, kv_cache[0], kv_cache[1], out, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), sb, so, sh, block_tables.stride(0),
        GROUP=h // hkv, HEAD_DIM=d, BLOCK_SIZE=bs, USE_WINDOW=sliding_window is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(d, 16), **qargs,
    )
    return out


def triton_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, sliding_window: Optional[int] = None,
                            num_splits: int = 1, out: Optional[torch.Tensor] = None,
                            block_n: int = 64) -> torch.Tensor:
    """One query per request (row r of q [B, H, D] is request r) over its paged context -> [B, H, D].

    With num_splits > 1 each request's context is cut into num_splits slices computed in parallel
    and merged by a reduction kernel (flash-decoding).
    """
    q = _unit_last(q)
    b, h, d = q.shape
    kv_cache, qargs = _quant_args(kv_cache)
    _, _, bs, hkv, _ = kv_cache.shape
    out = _empty_out(q, out)
    if b == 0:
        return out
    sb, so, sh = _cache_strides(kv_cache)
    block_tables = block_tables.contiguous()
    group = h // hkv
    block_d = _pow2(d, 16)
    if num_splits > 1:
        part_o = torch.empty((b, h, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((b, h, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out  # unused
    _decode_kernel[(b, hkv, num_splits)](
        q, kv_cache[0], kv_cache[1], out, part_o, part_ml, block_tables, seq_lens,
        scale * _LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), sb, so, sh, block_tables.stride(0),
        NUM_HEADS=h, GROUP=group, HEAD_DIM=d, BLOCK_SIZE=bs, USE_WINDOW=sliding_window is not None,
        NUM_SPLITS=num_splits, BLOCK_H=_pow2(group, 16), BLOCK_N=block_n, BLOCK_D=block_d, **qargs,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(b, h)](
            part_o, part_ml, out, out.stride(0), out.stride(1),
            NUM_HEADS=h, HEAD_DIM=d, NUM_SPLITS=num_splits, BLOCK_S=_pow2(num_splits), BLOCK_D=block_d,
        )
    return out


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      max_splits: int = 32, min_split_tokens: int = 256) -> int:
    """Splits per request for decode: enough programs to fill ~2 waves of SMs, slices of >= min_split_tokens.

    Rounded down to a power of two so few kernel variants get compiled.
    """
    programs = max(1, num_reqs * num_kv_heads)
    if programs >= num_sms:
        return 1
    want = min(max_splits, math.ceil(2 * num_sms / programs), max(1, max_seq_len // min_split_tokens))
    return 1 << (max(1, want).bit_length() - 1)


@dataclass
class TritonAttentionBackend:
    """Paged attention with Triton kernels; same contract as the reference backend.

    num_sms: SM count for the split heuristic (default: read from the CUDA device, 132 elsewhere).
    decode_num_splits: force the split count (tests, CUDA-graph capture); None = heuristic.
    The host-side `batch.seq_lens_cpu` is only a launch hint: a graph captured with the longest
    length in it stays correct for shorter contexts (slices then come out empty).
    """

    name: ClassVar[str] = "triton"
    block_m: int = 64
    block_n: int = 64
    decode_block_n: int = 64
    max_decode_splits: int = 32
    min_split_tokens: int = 256
    num_sms: Optional[int] = None
    decode_num_splits: Optional[int] = None

    def forward(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                kv_cache: torch.Tensor, batch: ForwardBatch, scale: Optional[float] = None,
                sliding_window: Optional[int] = None) -> torch.Tensor:
        """Write k, v [T, Hkv, D] (if given) at batch.slot_mapping, then attend q [T, H, D] -> [T, H, D]."""
        if k is not None and v is not None:
            triton_write_kv(kv_cache, k, v, batch.slot_mapping)
        return self.attention(q, kv_cache, batch, scale, sliding_window)

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch,
                  scale: Optional[float] = None, sliding_window: Optional[int] = None) -> torch.Tensor:
        """Attention only (K/V already written), like reference.paged_attention."""
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        if batch.num_reqs and batch.is_decode_only and q.shape[0] == batch.num_reqs:
            splits = self.splits_for(batch.num_reqs, kv_cache.shape[3], batch.max_seq_len, q.device)
            return triton_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, scale,
                                           sliding_window, splits, block_n=self.decode_block_n)
        return triton_prefill_attention(q, kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                        batch.max_query_len, scale, sliding_window,
                                        block_m=self.block_m, block_n=self.block_n)

    def splits_for(self, num_reqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
        if self.decode_num_splits is not None:
            return self.decode_num_splits
        sms = self.num_sms
        if sms is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        return choose_num_splits(num_reqs, num_kv_heads, max_seq_len, sms, self.max_decode_splits,
                                 self.min_split_tokens)
