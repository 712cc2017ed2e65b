"""Matmul against GGUF-quantized weights kept packed (Q4_0, Q4_1, Q8_0): `qlinear(x, qweight, qtype, bias)`.

A weight [N, K] is held as its raw GGUF bytes, a uint8 tensor [N, K/32 * block_bytes] (row n = the blocks of
output n). The C kernel (csrc/qlinear.c) dequantizes tiles of it on the fly and multiplies with float32
activations, so the result equals `x @ dequantize(qweight).T` up to summation order. `dequantize` is the
pure-PyTorch reference (and the fallback when the kernel cannot be built).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from tokenmill.ops.cpu.build import load_library

QK = 32  # weights per block
# name -> (kernel type id, bytes per block)
QTYPES: dict[str, tuple[int, int]] = {"q4_0": (0, 18), "q4_1": (1, 20), "q8_0": (2, 34)}
# up to this many rows the kernel unpacks each block into registers (no float buffer); measured crossover
DIRECT_MAX_ROWS = 3


@functools.lru_cache(maxsize=None)
def _lib() -> Optional[ctypes.CDLL]:
    lib = load_library("qlinear")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qlinear_f32.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64]
    lib.qlinear_f32.restype = ctypes.c_int
    lib.tm_amx_init.argtypes = []
    lib.tm_amx_init.restype = ctypes.c_int
    lib.qdequant_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    lib.qdequant_rows.restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the compiled kernel loads on this machine."""
    return _lib() is not None


@functools.lru_cache(maxsize=None)
def amx_available() -> bool:
    """True when the kernel was built with the AMX bf16 path and Linux grants this process the tile state."""
    lib = _lib()
    return lib is not None and bool(lib.tm_amx_init())


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one packed row of k weights."""
    if qtype not in QTYPES:
        raise ValueError(f"unsupported quantization type {qtype!r}; expected one of {', '.join(QTYPES)}")
    if k % QK:
        raise ValueError(f"row length {k} is not a multiple of the block size {QK}")
    return k // QK * QTYPES[qtype][1]


def dequantize(qweight: torch.Tensor, qtype: str, k: int) -> torch.Tensor:
    """Reference: packed uint8 [N, row_bytes] -> float32 [N, k] (the gguf package's math, in torch)."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, k // QK, QTYPES[qtype][1])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    if qtype == "q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(n, k)
    qs = blocks[..., 4:] if qtype == "q4_1" else blocks[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # [N, nb, 32]: low nibbles, then high
    if qtype == "q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        return (d * q + m).reshape(n, k)
    return (d * (q - 8.0)).reshape(n, k)


def qlinear(x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: Optional[torch.Tensor] = None,
            direct_max_rows: int = DIRECT_MAX_ROWS, amx_min_rows: int = 0) -> torch.Tensor:
    """x [..., K] float32 @ dequantize(qweight).T (+ bias) -> [..., N] float32.

    Calls with at most direct_max_rows rows use the kernel's register path, larger ones its buffered one.
    amx_min_rows > 0 (only where amx_available()): calls with at least that many rows use the AMX path, which
    rounds weights and activations to bfloat16 (the `gemm_dtype` bfloat16 numerics), summing in float32."""
    n, nbytes = qweight.shape
    k = x.shape[-1]
    lib = _lib()
    if lib is None or x.device.type != "cpu":
        return torch.nn.functional.linear(x.float(), dequantize(qweight, qtype, k), bias)
    kind, block = QTYPES[qtype]
    if k % QK or nbytes != k // QK * block:
        raise ValueError(f"packed weight has {nbytes} bytes per row, {qtype} with K={k} needs {row_bytes(qtype, k)}")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    if lib.qlinear_f32(kind, x2.data_ptr(), m, k, qweight.data_ptr(), n, bias.data_ptr() if bias is not None else None,
                       y.data_ptr(), direct_max_rows, amx_min_rows) != 0:
        raise ValueError(f"qlinear kernel rejected its arguments ({qtype}, K={k})")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def dequantize_rows(qweight: torch.Tensor, qtype: str, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the packed matrix, dequantized: [len(ids), k] float32 (an embedding lookup)."""
    lib = _lib()
    if lib is None or qweight.device.type != "cpu":
        return dequantize(qweight[ids.reshape(-1)], qtype, k).reshape(*ids.shape, k)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape[0], k, dtype=torch.float32)
    rc = lib.qdequant_rows(QTYPES[qtype][0], qweight.data_ptr(), qweight.shape[0], k, flat.data_ptr(),
                           flat.shape[0], out.data_ptr())
    if rc == -2:
        raise IndexError(f"row index out of range [0, {qweight.shape[0]})")
    if rc != 0:
        raise ValueError(f"qdequant_rows rejected its arguments ({qtype}, K={k})")
    return out.reshape(*ids.shape, k)
