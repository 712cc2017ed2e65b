"""The CPU fused MoE: grouped PyTorch ops, and one C call per layer for packed GGUF experts.

`fused_moe_grouped` (also correct on any device): token-expert pairs are sorted by expert (a stable argsort of
the flat expert ids); each active expert runs its gate|up and down projections once over its rows; the weighted
rows are scatter-added into the output. Experts with no tokens cost nothing. For PackedExperts the projections
are the qlinear kernel on the packed blocks, so no dense copy of the experts is ever made.
`fused_moe_cpu` runs packed experts in one C call per layer (csrc/moe.c: counting sort, tasks of (expert, output
rows) over the threads, each a qlinear_f32 call); dense experts, and any case the kernel cannot take, go to the
grouped path. Any block type the qlinear kernel learns (K-quants) works in both unchanged.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tokenmill.ops.cpu.build import load_library
from tokenmill.ops.cpu.qlinear import DIRECT_MAX_ROWS, QTYPES

_P, _L = ctypes.c_void_p, ctypes.c_int64
_ERRORS = {-1: "out of memory", -2: "expert id out of range", -7: "qlinear rejected its arguments"}


@functools.lru_cache(maxsize=1)
def _lib() -> Optional[ctypes.CDLL]:
    lib = load_library("moe")
    if lib is not None:
        lib.tm_moe_packed.argtypes = [ctypes.c_int, ctypes.c_int, _P, _L, _L, _L, _L, _L, _P, _P, _P, _L, _P, _L, _L,
                                      _L, _L, _L, _P, _L, _P]
        lib.tm_moe_packed.restype = ctypes.c_int
        lib.tm_moe_ws_floats.argtypes = [_L, _L, _L]
        lib.tm_moe_ws_floats.restype = _L
        lib.tm_amx_init.argtypes = []
        lib.tm_amx_init.restype = ctypes.c_int
        lib.tm_amx_init()  # this library's own copy of the AMX switch (experts' amx_min_rows use it)
    return lib


def moe_kernel_available() -> bool:
    return _lib() is not None


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """topk_ids [T, K] -> (order [T*K]: flat pair indices sorted by expert, token of each sorted pair [T*K],
    number of pairs per expert [E])."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [T*K]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order // topk_ids.shape[1], counts


def fused_moe_grouped(x: torch.Tensor, experts: Any, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], topk_weights / topk_ids [T, K] -> [T, H] (x's dtype), summed in float32."""
    t, hidden = x.shape
    out = torch.zeros(t, hidden, dtype=torch.float32, device=x.device)
    if t == 0:
        return out.to(x.dtype)
    order, tokens, counts = group_by_expert(topk_ids, experts.num_experts)
    weights = topk_weights.reshape(-1).float()[order]  # [T*K] in sorted order
    xs = x.index_select(0, tokens)  # [T*K, H]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate, up = experts.gate_up(e, xs[rows]).chunk(2, dim=-1)  # [n, I] each
        y = experts.down(e, F.silu(gate) * up)  # [n, H]
        out.index_add_(0, tokens[rows], y.float() * weights[rows, None])
        start += n
    return out.to(x.dtype)


class MoEWorkspace:
    """Scratch floats for the C op's row buffers (gathered x, gate|up, activations, expert outputs), shared by the
    MoE layers of one model (they run one after another). glibc maps blocks over its mmap threshold (32 MiB at
    most) afresh on every call, so without it a 512-token prefill step page-faulted ~100 MiB per layer
    (bench/moe_rows.py: 64 rows an expert, 133 ms a layer against 104 with the buffers kept). It grows to the
    largest call up to max_bytes; fused_moe_cpu runs a larger call in slices of tokens that fit (page-faulted afresh
    in every layer, a 2048-token OLMoE chunk's 470 MB took 388 ms a layer against 262 in 1170-token slices). The
    default cap holds a 2048-token step (the default token budget) of OLMoE-1B-7B (top 8 of 64 experts of 1024,
    hidden 2048: 335 MB) in one call: each expert's weights are dequantized into the AMX tiles once per call, so
    one call (163 ms a layer) beats two slices (200 ms)."""

    def __init__(self, max_bytes: int = 384 << 20):
        self.max_bytes = max_bytes
        self.buf = torch.empty(0, dtype=torch.float32)

    def fits(self, floats: int) -> bool:
        return floats * 4 <= self.max_bytes

    def get(self, floats: int) -> Optional[torch.Tensor]:
        if floats * 4 > self.max_bytes:
            return None
        if self.buf.numel() < floats:
            self.buf = torch.empty(floats, dtype=torch.float32)
        return self.buf


def _ws_floats(experts: Any, pairs: int, hidden: int) -> int:
    """Workspace floats the C op uses for `pairs` token-expert pairs (csrc/moe.c tm_moe_ws_floats; only called
    where the library is loaded): gathered x (then the expert outputs), gate|up, activations, tile slack."""
    return _lib().tm_moe_ws_floats(pairs, hidden, experts.intermediate_size)


def _scratch(experts: Any, pairs: int, hidden: int) -> tuple[Optional[int], int]:
    """(pointer, floats) of the experts' shared workspace for a call of `pairs` token-expert pairs, or (None, 0)."""
    ws = getattr(experts, "workspace", None)
    buf = ws.get(_ws_floats(experts, pairs, hidden)) if ws is not None else None
    return (buf.data_ptr(), buf.numel()) if buf is not None else (None, 0)


def slice_tokens(experts: Any, tokens: int, top_k: int, hidden: int) -> int:
    """Tokens per C call: all of them, or as many as the experts' workspace holds (at least one) when the whole
    call would not fit it."""
    ws = getattr(experts, "workspace", None)
    if ws is None or ws.fits(_ws_floats(experts, tokens * top_k, hidden)):
        return max(tokens, 1)
    per_token = _ws_floats(experts, top_k, hidden) - _ws_floats(experts, 0, hidden)
    return max(1, (ws.max_bytes // 4 - _ws_floats(experts, 0, hidden)) // per_token)


def fused_moe_cpu(x: torch.Tensor, experts: Any, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The CPU op: packed experts (float32 activations on the CPU) in one C call (or one per slice of tokens that
    fits the experts' workspace), everything else grouped."""
    qtype, down_qtype = getattr(experts, "qtype", None), getattr(experts, "down_qtype", None)
    lib = _lib() if qtype in QTYPES and down_qtype in QTYPES else None
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return fused_moe_grouped(x, experts, topk_weights, topk_ids)
    t, hidden = x.shape
    x = x.contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    w = topk_weights.to(torch.float32).contiguous()
    w13, w2 = experts.gate_up_proj, experts.down_proj  # uint8 [E, 2I, rb(H)], [E, H, rb(I)]
    out = torch.empty(t, hidden, dtype=torch.float32)
    k = ids.shape[1]
    step = slice_tokens(experts, t, k, hidden)
    for t0 in range(0, max(t, 1), step):
        n = min(step, t - t0)  # rows t0 .. t0 + n of x, ids, w and out (contiguous)
        rc = lib.tm_moe_packed(QTYPES[qtype][0], QTYPES[down_qtype][0], x[t0:].data_ptr(), n, hidden,
                               experts.intermediate_size, experts.num_experts, k, ids[t0:].data_ptr(),
                               w[t0:].data_ptr(), w13.data_ptr(), w13.shape[-1], w2.data_ptr(), w2.shape[-1],
                               DIRECT_MAX_ROWS, getattr(experts, "i8_max_rows", DIRECT_MAX_ROWS),
                               getattr(experts, "amx_i8_min_rows", 0), getattr(experts, "amx_min_rows", 0),
                               *_scratch(experts, n * k, hidden), out[t0:].data_ptr())
        if rc != 0:
            raise ValueError(f"fused MoE kernel: {_ERRORS.get(rc, f'error {rc}')}")
    return out
