"""Quantized paged KV cache: int8 with per-token scales, fp8 (e4m3) with per-head scales.

Layout of one layer (`QuantizedKVCache`):
- `data`  [2, num_blocks, block_size, Hkv, D]  int8 or float8_e4m3fn (index 0 = keys, 1 = values), the same
  block/slot layout as the unquantized cache of `reference.py`.
- `scale` int8: [2, num_blocks, block_size, Hkv] float32, one scale per (token, KV head), set on write
           (absmax / 127 over head_dim: symmetric, round to nearest).
          fp8:  [2, Hkv] float32, one static scale per KV head (default 1.0: e4m3 covers +-448, which holds the
           K/V of the usual checkpoints; a calibrated scale can be copied in). Values are clamped to +-448.

K/V are quantized on write and dequantized to the compute dtype before the matmuls. The CPU path
(`quantized_paged_attention`) dequantizes only the blocks the batch reads into a compact temporary cache
and runs the unchanged `reference.paged_attention` on it (block tables remapped), so every optimization
of the reference path applies as is. The model code only passes the object through: backends dispatch on it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from tokenmill.errors import ConfigError
from tokenmill.ops.attention.reference import paged_attention
from tokenmill.worker.forward_batch import ForwardBatch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8", "int8")  # the kv_cache_dtype settings
# plain (unquantized) caches by resolved name; float16 only as a float16 model's `auto`
PLAIN_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED_KV_DTYPES = ("fp8", "int8")


@dataclass
class QuantizedKVCache:
    """One layer's quantized KV cache: `data` [2, NB, BS, Hkv, D] + `scale` (see the module docstring)."""

    data: torch.Tensor
    scale: torch.Tensor
    kind: str  # "int8" | "fp8"

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def per_token_scales(self) -> bool:
        return self.kind == "int8"

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def resolve_kv_cache_dtype(kind: str, model_dtype: torch.dtype, device_type: str, cpu_bf16_in_place: bool) -> str:
    """What a kv_cache_dtype setting means for this model and device: "float32", "bfloat16", "float16" (plain
    caches) or "int8", "fp8" (quantized). Pure; every place that sizes or allocates the KV cache uses it.

    auto = bfloat16 on the CPU when the model computes in float32 and the CPU attention kernel reads bf16 K/V in
    place on this machine (`cpu_bf16_in_place`: tokenmill.ops.cpu.attention.reads_kv_in_place(torch.bfloat16,
    head_dim) with the cpu attention backend; half the bytes read per decode step); otherwise the model dtype
    (always on CUDA). The explicit settings mean themselves, whatever the model dtype.
    """
    if kind not in KV_CACHE_DTYPES:
        raise ConfigError(f"unknown kv_cache_dtype {kind!r}; choose one of {', '.join(KV_CACHE_DTYPES)}",
                          param="kv_cache_dtype")
    if kind != "auto":
        return kind
    if device_type == "cpu" and model_dtype == torch.float32 and cpu_bf16_in_place:
        return "bfloat16"
    name = str(model_dtype).removeprefix("torch.")
    if name not in PLAIN_KV_DTYPES:
        raise ConfigError(f"kv_cache_dtype auto: no KV cache of the model dtype {name}", param="kv_cache_dtype")
    return name


def plain_kv_dtype(resolved: str) -> torch.dtype:
    """The torch dtype of a plain cache, from resolve_kv_cache_dtype's result."""
    if resolved not in PLAIN_KV_DTYPES:
        raise ConfigError(f"{resolved!r} is not a plain KV cache dtype (resolve kv_cache_dtype first)")
    return PLAIN_KV_DTYPES[resolved]


def storage_dtype(kind: str) -> torch.dtype:
    if kind == "int8":
        return torch.int8
    if kind == "fp8":
        return FP8_DTYPE
    raise ConfigError(f"unknown kv_cache_dtype {kind!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")


def kv_bytes_per_token_per_layer(resolved: str, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token's K and V take in one layer of a cache of resolve_kv_cache_dtype's `resolved` dtype,
    scales included (static fp8 scales are per layer: 0)."""
    if resolved in PLAIN_KV_DTYPES:
        return 2 * num_kv_heads * head_dim * PLAIN_KV_DTYPES[resolved].itemsize
    scale_bytes = 4 if resolved == "int8" else 0
    return 2 * num_kv_heads * (head_dim * storage_dtype(resolved).itemsize + scale_bytes)


def allocate_quantized_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                                head_dim: int, kind: str, device: torch.device | str) -> list[QuantizedKVCache]:
    dt = storage_dtype(kind)
    out = []
    for _ in range(num_layers):
        data = torch.zeros((2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dt, device=device)
        if kind == "int8":
            scale = torch.zeros((2, num_blocks, block_size, num_kv_heads), dtype=torch.float32, device=device)
        else:
            scale = torch.ones((2, num_kv_heads), dtype=torch.float32, device=device)
        out.append(QuantizedKVCache(data, scale, kind))
    return out


# ---- quantize / dequantize -------------------------------------------------------------------------
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [...]) with x ~= q * scale (per-row absmax)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / INT8_MAX
    q = torch.round(xf / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., Hkv, D], scale [Hkv] -> float8_e4m3fn (x / scale, saturated at +-448)."""
    return (x.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """int8: data [..., Hkv, D] with scale [..., Hkv]; fp8: scale [Hkv] (broadcast) -> dtype."""
    if kind == "int8":
        return (data.to(torch.float32) * scale[..., None]).to(dtype)
    return (data.to(torch.float32) * scale[:, None]).to(dtype)


# ---- paged write / read ----------------------------------------------------------------------------
def write_kv_quantized(cache: QuantizedKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantize k, v [T, Hkv, D] and store them at their slots (slots < 0 are padding and skipped)."""
    _, nb, bs, hkv, d = cache.data.shape
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if slot_mapping.numel() == 0:
        return
    # index_copy_ has no float8 kernel on CPU: copy the raw bytes instead
    flat = cache.data.view(torch.uint8) if cache.kind == "fp8" else cache.data
    for i, x in enumerate((k, v)):
        if cache.kind == "int8":
            qx, sx = quantize_int8(x)
            cache.scale[i].view(nb * bs, hkv).index_copy_(0, slot_mapping, sx)
            flat[i].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, qx)
        else:
            qx = quantize_fp8(x, cache.scale[i])
            flat[i].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, qx.view(torch.uint8))


def dequantize_blocks(cache: QuantizedKVCache, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The blocks block_ids [U] of cache, dequantized: [2, U, BS, Hkv, D] in dtype."""
    data = cache.data.index_select(1, block_ids) if cache.kind == "int8" else \
        cache.data.view(torch.uint8).index_select(1, block_ids).view(FP8_DTYPE)
    if cache.kind == "int8":
        return dequantize(data, cache.scale.index_select(1, block_ids), "int8", dtype)
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    for i in range(2):
        out[i] = dequantize(data[i], cache.scale[i], "fp8", dtype)
    return out


def compact_dequantized(cache: QuantizedKVCache, batch: ForwardBatch,
                        dtype: torch.dtype) -> tuple[torch.Tensor, ForwardBatch]:
    """Dequantize the blocks `batch` reads into a compact cache; returns it and the batch with remapped tables."""
    bs = cache.data.shape[2]
    nblk = -(-batch.max_seq_len // bs) if batch.num_reqs else 0
    tables = batch.block_tables[:, :max(nblk, 1)].long()
    uniq, inverse = torch.unique(tables, return_inverse=True)
    dense = dequantize_blocks(cache, uniq, dtype)
    return dense, dataclasses.replace(batch, block_tables=inverse.to(torch.int32))


def quantized_paged_attention(q: torch.Tensor, cache: QuantizedKVCache, batch: ForwardBatch,
                              scale: Optional[float] = None, sliding_window: Optional[int] = None) -> torch.Tensor:
    """reference.paged_attention over a quantized cache (this step's K/V already written) -> [T, H, D]."""
    dense, remapped = compact_dequantized(cache, batch, q.dtype)
    return paged_attention(q, dense, remapped, scale, sliding_window)
