"""Fused residual add + RMSNorm for float32 CPU rows (csrc/rmsnorm.c); None when the kernel cannot be built."""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from tokenmill.ops.cpu.build import load_library


@functools.lru_cache(maxsize=None)
def _lib() -> Optional[ctypes.CDLL]:
    lib = load_library("rmsnorm")
    if lib is not None:
        p = ctypes.c_void_p
        lib.add_rmsnorm_f32.argtypes = [p, p, p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, p, p]
        lib.add_rmsnorm_f32.restype = None
    return lib


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                eps: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(weight * s / sqrt(mean(s^2) + eps), s) with s = x + residual (or x); None if the kernel cannot run
    these tensors (not float32 contiguous 2-D CPU, or no compiler): the caller then uses PyTorch."""
    lib = _lib()
    if (lib is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu"
            or weight.dtype != torch.float32 or not weight.is_contiguous()):
        return None
    if residual is not None and (residual.dtype != torch.float32 or residual.shape != x.shape
                                 or not residual.is_contiguous()):
        return None
    m, d = x.shape
    if weight.numel() != d:
        raise ValueError(f"RMSNorm weight has {weight.numel()} values for rows of {d}")
    out = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x
    lib.add_rmsnorm_f32(x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(),
                        m, d, eps, s.data_ptr() if residual is not None else None, out.data_ptr())
    return out, s
