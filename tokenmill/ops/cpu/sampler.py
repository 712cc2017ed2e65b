"""The sampler's stage 2 and draw fused per row on the CPU (csrc/sampler.c): temperature, min_p, top_k, top_p and
the inverse-CDF draw with the row's uniform, without sorting the vocabulary. The reference is the PyTorch path of
tokenmill/sample (apply_sampling_filters, softmax, inverse_cdf): the same token for the same uniform up to float
rounding at a boundary. `sample_rows` returns None where the kernel cannot run (no compiler, not a CPU tensor)."""
from __future__ import annotations

import ctypes
import functools
from typing import Optional, Sequence

import torch

from tokenmill.ops.cpu.build import load_library
from tokenmill.sampling_params import SamplingParams


@functools.lru_cache(maxsize=None)
def _lib() -> Optional[ctypes.CDLL]:
    lib = load_library("sampler")
    if lib is not None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.tm_sample_rows.argtypes = [p, i64, i64, i64, p, p, p, p, p, p, p]
        lib.tm_sample_rows.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _lib() is not None


def sample_rows(x: torch.Tensor, params: Sequence[SamplingParams], u: torch.Tensor) -> Optional[torch.Tensor]:
    """Token [B] (long) per row of logits x [B, V] (after the penalties) for uniforms u [B] (float64) under each
    row's temperature, min_p, top_k and top_p; greedy rows get -1 (the caller takes their argmax). None when the
    kernel cannot run here."""
    lib = _lib()
    if lib is None or x.device.type != "cpu" or x.dim() != 2:
        return None
    x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, V = x.shape
    table = torch.tensor([[0.0 if p.greedy else p.temperature, p.min_p, p.top_p] for p in params],
                         dtype=torch.float32).reshape(B, 3).t().contiguous()
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else 0 for p in params], dtype=torch.int64)
    u = u.to(torch.float64).contiguous()
    work = torch.empty(B, V, dtype=torch.float32)
    out = torch.empty(B, dtype=torch.int64)
    rc = lib.tm_sample_rows(x.data_ptr(), B, V, x.stride(0), table[0].data_ptr(), table[1].data_ptr(),
                            top_k.data_ptr(), table[2].data_ptr(), u.data_ptr(), work.data_ptr(), out.data_ptr())
    if rc != 0:
        raise MemoryError("the CPU sampler could not allocate its scratch")
    return out
