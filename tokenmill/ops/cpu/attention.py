"""ctypes wrapper of the compiled CPU paged-attention kernel (`csrc/attention.c`).

Same semantics as `reference.paged_attention`: causal attention of the packed queries over each request's
cached K/V, read straight from the block pool (no gather copy), one pass with online softmax, GQA heads
sharing each K/V load, split-K for long single requests. The K/V of this step must already be written.
The cache is a plain tensor or an int8 / fp8 `kv_quant.QuantizedKVCache`, read with its scales in place
(dequantized in registers on AVX-512, else chunk by chunk into float32 scratch).
`cpu_prefill_attention` is the same call with bf16 products for prefill chunks (`csrc/attention_prefill.c`): on the
AMX tile unit where the CPU has it, else with AVX512-BF16's vdpbf16ps (`csrc/attention_prefill_bf16.c`).
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional, Union

import torch

from tokenmill.ops.attention.kv_quant import FP8_DTYPE, QuantizedKVCache
from tokenmill.ops.cpu.build import build_error, load_library
from tokenmill.worker.forward_batch import ForwardBatch

# the kernel's codes of a cache's storage dtype (int8 / fp8: a QuantizedKVCache's data, read with its scales)
KV_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, FP8_DTYPE: 4}
_ERRORS = {-1: "out of memory", -2: "block id out of range", -3: "unsupported KV dtype",
           -4: "inconsistent shapes (seq_lens / query_start_loc / block tables)",
           -5: "the prefill kernel is unavailable for this KV dtype / head dim"}
# tm_prefill_attention_path: which prefill kernel tm_prefill_attention_init chose
_PREFILL_PATHS = {1: "amx", 2: "avx512-bf16"}
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


@functools.lru_cache(maxsize=1)
def _kernel() -> Optional[ctypes.CDLL]:
    lib = load_library("attention")
    if lib is None:
        return None
    lib.tm_paged_attention.restype = _I
    lib.tm_paged_attention.argtypes = [_P, _L, _L, _P, _I, _L, _I, _I, _I, _P, _L, _L, _P, _P, _I, _I, _F, _I, _P]
    lib.tm_paged_attention_kv.restype = _I
    lib.tm_paged_attention_kv.argtypes = [_P, _L, _L, _P, _I, _P, _L, _I, _I, _I, _P, _L, _L, _P, _P, _I, _I, _F, _I,
                                          _P]
    lib.tm_kv_dtype_supported.restype = _I
    lib.tm_kv_dtype_supported.argtypes = [_I]
    lib.tm_kv_read_in_place.restype = _I
    lib.tm_kv_read_in_place.argtypes = [_I, _I]
    lib.tm_gather_kv_bf16.restype = _I
    lib.tm_gather_kv_bf16.argtypes = [_P, _L, _I, _L, _P, _L, _P]
    lib.tm_prefill_attention.restype = _I
    lib.tm_prefill_attention.argtypes = lib.tm_paged_attention.argtypes
    lib.tm_prefill_attention_supported.restype = _I
    lib.tm_prefill_attention_supported.argtypes = [_I, _I]
    lib.tm_prefill_attention_init.restype = _I
    lib.tm_prefill_attention_path.restype = _I
    lib.tm_prefill_attention_init()  # the prefill kernel: AMX where Linux grants the tile state, else AVX512-BF16
    return lib


def cpu_attention_available() -> bool:
    """Whether the kernel library builds and loads on this machine."""
    return _kernel() is not None


def supports_kv_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernel reads a KV cache of this (storage) dtype (float32, bfloat16, int8 and fp8 e4m3 with their
    scales; float16 where the compiler has _Float16)."""
    lib = _kernel()
    return lib is not None and dtype in KV_DTYPE_CODES and bool(lib.tm_kv_dtype_supported(KV_DTYPE_CODES[dtype]))


def reads_kv_in_place(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel's SIMD paths read a KV cache of this dtype and head dim straight from the pool:
    float32 always; bfloat16, int8 and fp8 on AVX-512 CPUs (AVX512F + BW) with head_dim % 16 == 0. Other readable
    dtypes are converted (dequantized) chunk by chunk into float32 scratch first. False without the kernel."""
    lib = _kernel()
    return (lib is not None and dtype in KV_DTYPE_CODES
            and bool(lib.tm_kv_read_in_place(KV_DTYPE_CODES[dtype], int(head_dim))))


def prefill_kernel_name() -> Optional[str]:
    """The prefill kernel `cpu_prefill_attention` runs here: "amx" (an AMX-BF16 CPU whose tile state Linux granted),
    "avx512-bf16" (vdpbf16ps, e.g. Zen 4), or None (neither: no prefill kernel)."""
    lib = _kernel()
    return None if lib is None else _PREFILL_PATHS.get(lib.tm_prefill_attention_path())


def prefill_kernel_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `cpu_prefill_attention` runs here for a KV cache of this dtype and head dim: a prefill kernel
    (`prefill_kernel_name`: AMX-BF16 with the tile state granted, else AVX512-BF16), float32 or bfloat16 K/V,
    head_dim % 32 == 0 (<= 256)."""
    lib = _kernel()
    return (lib is not None and dtype in (torch.float32, torch.bfloat16)
            and bool(lib.tm_prefill_attention_supported(KV_DTYPE_CODES[dtype], int(head_dim))))


def _int32(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as int32 on the CPU with a unit last stride (rows of a 2-D table may keep their stride)."""
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.dtype != torch.int32 or t.stride(-1) != 1 or (t.dim() == 1 and not t.is_contiguous()):
        t = t.to(torch.int32).contiguous()
    return t


def cpu_paged_attention(q: torch.Tensor, kv_cache: Union[torch.Tensor, QuantizedKVCache], batch: ForwardBatch,
                        scale: Optional[float] = None, sliding_window: Optional[int] = None) -> torch.Tensor:
    """q [T, H, D], kv_cache [2, num_blocks, block_size, Hkv, D] (or an int8 / fp8 QuantizedKVCache of that shape)
    -> [T, H, D] (q's dtype; computed in float32)."""
    return _attention("tm_paged_attention", q, kv_cache, batch, scale, sliding_window)


def cpu_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: Optional[float] = None,
                          sliding_window: Optional[int] = None) -> torch.Tensor:
    """`cpu_paged_attention` with bf16 products (csrc/attention_prefill.c: AMX tiles, or AVX512-BF16's vdpbf16ps in
    csrc/attention_prefill_bf16.c): q, K, V and the probabilities rounded to bfloat16, products summed and the
    softmax computed in float32. Meant for prefill chunks (16 query tokens of a head per tile; any request works,
    decodes waste most of a tile). Where `prefill_kernel_supports` is false it raises ValueError."""
    if not prefill_kernel_supports(kv_cache.dtype, q.shape[-1] if q.dim() == 3 else 0):
        raise ValueError(f"the prefill attention kernel is unavailable here for a {kv_cache.dtype} KV cache and "
                         f"head_dim {q.shape[-1]}")
    return _attention("tm_prefill_attention", q, kv_cache, batch, scale, sliding_window)


def quantized_layout_error(cache: QuantizedKVCache) -> Optional[str]:
    """Why the kernels cannot read this quantized cache in the layout kv_quant.py allocates (the kernels index its
    data and scales), or None: int8 / fp8 data, float32 contiguous scales on the CPU, [2, NB, BS, Hkv] (int8) or
    [2, Hkv] (fp8)."""
    _, nb, bs, hkv, _ = cache.data.shape
    want = (2, nb, bs, hkv) if cache.kind == "int8" else (2, hkv)
    if cache.data.dtype != (torch.int8 if cache.kind == "int8" else FP8_DTYPE):
        return f"a {cache.kind} KV cache holds {cache.data.dtype} data"
    if (tuple(cache.scale.shape) != want or cache.scale.dtype != torch.float32 or not cache.scale.is_contiguous()
            or cache.scale.device.type != "cpu"):
        return (f"{cache.kind} KV scales must be contiguous float32 {want} on the CPU, got "
                f"{cache.scale.dtype} {tuple(cache.scale.shape)}")
    return None


def _kv_scale(cache: QuantizedKVCache) -> torch.Tensor:
    """The scales of a quantized cache, its layout checked (quantized_layout_error)."""
    error = quantized_layout_error(cache)
    if error is not None:
        raise ValueError(error)
    return cache.scale


def _attention(fn: str, q: torch.Tensor, kv: Union[torch.Tensor, QuantizedKVCache], batch: ForwardBatch,
               scale: Optional[float], sliding_window: Optional[int]) -> torch.Tensor:
    lib = _kernel()
    if lib is None:
        raise RuntimeError(f"CPU attention kernel unavailable: {build_error('attention')}")
    kv_scale = _kv_scale(kv) if isinstance(kv, QuantizedKVCache) else None
    if kv_scale is not None and fn != "tm_paged_attention":
        raise ValueError(f"{fn} cannot read a quantized KV cache")
    kv_cache = kv.data if kv_scale is not None else kv
    if kv_scale is None and kv_cache.dtype in (torch.int8, FP8_DTYPE):
        raise ValueError(f"a {kv_cache.dtype} KV cache needs its scales: pass the QuantizedKVCache")
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"expected q [T, H, D] and kv_cache [2, NB, BS, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(kv_cache.shape)}")
    if q.device.type != "cpu" or kv_cache.device.type != "cpu":
        raise ValueError("cpu_paged_attention needs CPU tensors")
    t, h, d = q.shape
    _, nb, bs, hkv, dk = kv_cache.shape
    if dk != d or h % hkv:
        raise ValueError(f"q heads/dim {h}/{d} do not fit the KV cache's {hkv}/{dk}")
    if bs != batch.block_size:
        raise ValueError(f"KV cache block size {bs} != batch block size {batch.block_size}")
    if not supports_kv_dtype(kv_cache.dtype):
        raise ValueError(f"the CPU attention kernel cannot read a {kv_cache.dtype} KV cache")
    if not kv_cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous")
    if sum(batch.query_lens_cpu) != t or len(batch.query_lens_cpu) + 1 != batch.query_start_loc.numel():
        raise ValueError(f"batch covers {sum(batch.query_lens_cpu)} tokens, q has {t}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qf = q if q.dtype == torch.float32 else q.float()
    if qf.stride(2) != 1:
        qf = qf.contiguous()
    out = torch.empty((t, h, d), dtype=torch.float32)
    if t == 0:
        return out.to(q.dtype)
    tables = _int32(batch.block_tables, "block_tables")
    seq_lens = _int32(batch.seq_lens, "seq_lens")
    qsl = _int32(batch.query_start_loc, "query_start_loc")
    if tables.dim() != 2 or tables.shape[0] != batch.num_reqs or seq_lens.numel() != batch.num_reqs:
        raise ValueError("block_tables / seq_lens do not match the batch's requests")
    shape_args = (nb, bs, hkv, d, tables.data_ptr(), tables.stride(0), tables.shape[1], seq_lens.data_ptr(),
                  qsl.data_ptr(), batch.num_reqs, h, float(scale), int(sliding_window or 0), out.data_ptr())
    if kv_scale is not None:
        rc = lib.tm_paged_attention_kv(qf.data_ptr(), qf.stride(0), qf.stride(1), kv_cache.data_ptr(),
                                       KV_DTYPE_CODES[kv_cache.dtype], kv_scale.data_ptr(), *shape_args)
    else:
        rc = getattr(lib, fn)(qf.data_ptr(), qf.stride(0), qf.stride(1), kv_cache.data_ptr(),
                              KV_DTYPE_CODES[kv_cache.dtype], *shape_args)
    if rc != 0:
        name = "cpu_paged_attention" if fn == "tm_paged_attention" else "cpu_prefill_attention"
        raise ValueError(f"{name}: {_ERRORS.get(rc, f'error {rc}')}")
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def gather_kv_bf16(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.gather_kv` of a float32 cache, converted to bfloat16 in the same pass (for bf16 SDPA):
    K, V [seq_len, Hkv, D] each. Falls back to the reference gather + conversion without the kernel."""
    lib = _kernel()
    if lib is None or kv_cache.dtype != torch.float32 or not kv_cache.is_contiguous():
        from tokenmill.ops.attention.reference import gather_kv

        k, v = gather_kv(kv_cache, block_ids, seq_len)
        return k.to(torch.bfloat16), v.to(torch.bfloat16)
    _, nb, bs, hkv, d = kv_cache.shape
    ids = _int32(block_ids[:(seq_len + bs - 1) // bs], "block_ids")
    out = torch.empty(2, seq_len, hkv, d, dtype=torch.bfloat16)
    if lib.tm_gather_kv_bf16(kv_cache.data_ptr(), nb, bs, hkv * d, ids.data_ptr(), seq_len, out.data_ptr()) != 0:
        raise ValueError("gather_kv_bf16: block id out of range")
    return out[0], out[1]
