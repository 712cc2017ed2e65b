"""A whole mixture-of-experts decoder layer in one C call (`csrc/moe_layer.c`) for CPU decode steps.

The per-op path of an OLMoE layer at 16 decodes is ~60 PyTorch dispatches plus Python around its kernels (norms,
q|k|v, q/k norm, rotary in PyTorch ops, K/V write, attention, o, router, softmax / top-k, the expert counts, the
fused MoE op). `fuse_moe_layers(model)` installs `FusedMoELayer` as the `fast_path` of every layer that qualifies
(`moe_layer_qualifies`): packed attention linears, a plain softmax top-k MoEBlock without a shared expert over
packed experts run by the CPU fused MoE op, float32 norms and router. A step runs in one call when its attention
would run on the paged C decode kernel anyway (every request's query shorter than PREFILL_MIN_TOKENS, where the
backend switches to its prefill kernel) and the linears would not switch to a dense copy; otherwise, or for a KV
cache the kernel cannot take, it returns None and the layer runs its per-op path, the reference the tests compare
against (tests/ops/test_cpu_moe_layer.py).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional

import torch

from tokenmill.ops.attention.backend import PREFILL_MIN_TOKENS, CpuAttentionBackend
from tokenmill.ops.cpu.build import load_library
from tokenmill.ops.cpu.layer import _KV_CODES, _Shared, linear_args, step_inputs
from tokenmill.ops.cpu.qlinear import DIRECT_MAX_ROWS, QTYPES
from tokenmill.worker.forward_batch import ForwardBatch

_ERRORS = {-1: "out of memory", -2: "expert or block id out of range", -3: "unsupported KV dtype",
           -4: "inconsistent shapes", -6: "slot outside the KV cache", -7: "a linear rejected its arguments"}

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_QK_NORMS = {None: 0, "full": 1, "head": 2}


class TmMoELayer(ctypes.Structure):
    """csrc/moe_layer.c tm_moe_layer_t: one layer's weights, shapes and switches (8-byte fields, in order)."""

    _fields_ = [(n, ctypes.c_int64) for n in ("hidden", "heads", "kv_heads", "head_dim", "window")] + \
        [(n, ctypes.c_double) for n in ("eps", "scale", "clip")] + [("qk_norm", ctypes.c_int64)] + \
        [(n, ctypes.c_void_p) for n in ("ln1", "ln2", "q_norm", "k_norm")] + \
        [("qt_qkv", ctypes.c_int64), ("w_qkv", ctypes.c_void_p), ("b_qkv", ctypes.c_void_p),
         ("qt_o", ctypes.c_int64), ("w_o", ctypes.c_void_p), ("b_o", ctypes.c_void_p),
         ("lin_direct_max_m", ctypes.c_int64), ("lin_amx_min_m", ctypes.c_int64), ("w_router", ctypes.c_void_p)] + \
        [(n, ctypes.c_int64) for n in ("num_experts", "top_k", "renormalize", "inter", "qt13", "qt2")] + \
        [("w13", ctypes.c_void_p), ("w2", ctypes.c_void_p)] + \
        [(n, ctypes.c_int64) for n in ("row_bytes_h", "row_bytes_i", "direct_max_m", "i8_max_m", "amx_i8_min_m",
                                       "amx_min_m")] + [("expert_counts", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def _lib() -> Optional[ctypes.CDLL]:
    lib = load_library("moe_layer")
    if lib is not None:
        lib.tm_moe_layer.argtypes = [_P, _P, _P, _I, _L, _P, _P, _P, _I, _L, _I, _P, _P, _L, _L, _P, _P, _I, _P, _P,
                                     _L, _P]
        lib.tm_moe_layer.restype = _I
        lib.tm_moe_layer_scratch_floats.argtypes = [_L] * 6
        lib.tm_moe_layer_scratch_floats.restype = _L
        lib.tm_moe_ws_floats.argtypes = [_L, _L, _L]
        lib.tm_moe_ws_floats.restype = _L
        lib.tm_amx_init.restype = _I
        lib.tm_amx_init()  # this library's own AMX switch (its linears and experts use amx_min_rows only if granted)
    return lib


def moe_layer_qualifies(layer: Any) -> bool:
    """Whether `layer` can run in one call: SelfAttention over packed linears (any q/k norm, clipping, bias), a
    MoEBlock (softmax top-k; not DeepSeek's grouped routing) without a shared expert over PackedExperts, float32
    norms and router, no sliding window."""
    from tokenmill.model.layers.attention import SelfAttention
    from tokenmill.model.layers.moe import MoEBlock, PackedExperts
    from tokenmill.model.layers.quantized import MixedQuantizedLinear, QuantizedLinear

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(attn) is not SelfAttention or type(mlp) is not MoEBlock or mlp.shared_expert is not None:
        return False
    ex = mlp.experts
    if not isinstance(ex, PackedExperts) or ex.qtype not in QTYPES or ex.down_qtype not in QTYPES:
        return False
    lin = [attn.qkv_proj, attn.o_proj]
    if not all(type(m) in (QuantizedLinear, MixedQuantizedLinear) and m.weight.device.type == "cpu" for m in lin):
        return False
    if attn.attn.sliding_window or attn.head_dim % 2 or attn.qkv_proj.amx_min_rows != attn.o_proj.amx_min_rows:
        return False
    gate = mlp.gate
    if type(gate.weight) is not torch.nn.Parameter or gate.weight.dtype != torch.float32 \
            or not gate.weight.is_contiguous() or getattr(gate, "bias", None) is not None \
            or gate.weight.shape != (mlp.num_experts, layer.input_layernorm.weight.shape[0]):
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if attn.qk_norm is not None:
        norms += [attn.q_norm, attn.k_norm]
    if not all(n.weight.dtype == torch.float32 and n.weight.is_contiguous() and n.eps == norms[0].eps for n in norms):
        return False
    return all(b is None or (b.dtype == torch.float32 and b.is_contiguous()) for b in (m.bias for m in lin))


class FusedMoELayer:
    """The fast path of one MoE DecoderLayer (see moe_layer_qualifies); `__call__` returns (h, residual) or None
    (use the per-op path)."""

    def __init__(self, layer: Any, shared: "_Shared"):
        from tokenmill.model.layers.quantized import dense_switch_rows
        from tokenmill.ops.moe.cpu import fused_moe_cpu

        attn, mlp = layer.self_attn, layer.mlp
        ex = mlp.experts
        self.shared, self.mlp, self.attn = shared, mlp, attn.attn
        self._fused_op = fused_moe_cpu
        lin = [attn.qkv_proj, attn.o_proj]
        # steps of more tokens: a linear's dense copy would take them on the per-op path
        self.max_tokens = (dense_switch_rows(lin) or 1 << 30) - 1
        self.hidden, self.num_heads, self.num_kv_heads = ex.hidden_size, attn.num_heads, attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.nq, self.nqkv = attn.q_size, attn.q_size + 2 * attn.kv_size
        self._keep = (lin, mlp.gate.weight, ex.gate_up_proj, ex.down_proj)  # the pointers below point into these
        st = TmMoELayer()
        st.hidden, st.heads, st.kv_heads, st.head_dim, st.window = (self.hidden, attn.num_heads, attn.num_kv_heads,
                                                                    attn.head_dim, 0)
        st.eps, st.scale = float(layer.input_layernorm.eps), float(attn.attn.scale)
        st.clip = float(attn.clip_qkv) if attn.clip_qkv is not None else 0.0
        st.qk_norm = _QK_NORMS[attn.qk_norm]
        st.ln1, st.ln2 = layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr()
        if attn.qk_norm is not None:
            st.q_norm, st.k_norm = attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()
        st.qt_qkv, st.w_qkv, st.b_qkv = linear_args(attn.qkv_proj)
        st.qt_o, st.w_o, st.b_o = linear_args(attn.o_proj)
        st.lin_direct_max_m = DIRECT_MAX_ROWS
        st.lin_amx_min_m = attn.qkv_proj.amx_min_rows  # moe_layer_qualifies: o_proj's is the same
        st.w_router = mlp.gate.weight.data_ptr()
        st.num_experts, st.top_k, st.renormalize, st.inter = mlp.num_experts, mlp.top_k, int(mlp.renormalize), \
            ex.intermediate_size
        st.qt13, st.qt2 = QTYPES[ex.qtype][0], QTYPES[ex.down_qtype][0]
        st.w13, st.w2 = ex.gate_up_proj.data_ptr(), ex.down_proj.data_ptr()
        st.row_bytes_h, st.row_bytes_i = ex.gate_up_proj.shape[-1], ex.down_proj.shape[-1]
        st.direct_max_m, st.i8_max_m = DIRECT_MAX_ROWS, ex.i8_max_rows
        st.amx_i8_min_m, st.amx_min_m = ex.amx_i8_min_rows, ex.amx_min_rows
        st.expert_counts = mlp.expert_counts.data_ptr()
        self.st = st
        self.experts = ex

    def __call__(self, h: torch.Tensor, residual: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 kv_cache: Any, batch: ForwardBatch) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        t = h.shape[0]
        if (t > self.max_tokens or self.mlp.op is not self._fused_op
                or batch.max_query_len >= PREFILL_MIN_TOKENS or not isinstance(self.attn.backend, CpuAttentionBackend)):
            return None  # long chunks attend through the prefill kernel on the per-op path; a swapped op (offload) runs there too
        if self.mlp.expert_counts.data_ptr() != self.st.expert_counts:
            return None  # the counts buffer was replaced (moved): the per-op path counts into the new one
        inputs = step_inputs(self.shared, self.num_kv_heads, self.head_dim, h, residual, cos, sin, kv_cache, batch)
        if inputs is None:
            return None
        meta, residual, has_residual = inputs
        out = torch.empty_like(h)
        lib = self.shared.lib
        scratch = self.shared.work(lib.tm_moe_layer_scratch_floats(t, self.hidden, self.nqkv, self.nq,
                                                                      self.st.num_experts, self.st.top_k))
        ws_floats = lib.tm_moe_ws_floats(t * self.st.top_k, self.hidden, self.st.inter)
        ws = self.experts.workspace.get(ws_floats) if self.experts.workspace is not None else None
        _, nb, bs, _, _ = kv_cache.shape
        rc = lib.tm_moe_layer(
            ctypes.byref(self.st), h.data_ptr(), residual.data_ptr(), has_residual, t, cos.data_ptr(), sin.data_ptr(),
            kv_cache.data_ptr(), _KV_CODES[kv_cache.dtype], nb, bs, meta.slots.data_ptr(), meta.tables.data_ptr(),
            meta.tables.stride(0), meta.tables.shape[1], meta.seq_lens.data_ptr(), meta.qsl.data_ptr(),
            meta.num_reqs, scratch.data_ptr(), ws.data_ptr() if ws is not None else None,
            ws.numel() if ws is not None else 0, out.data_ptr())
        if rc != 0:
            raise ValueError(f"fused CPU MoE layer: {_ERRORS.get(rc, f'error {rc}')}")
        return out, residual


def fuse_moe_layers(model: Any) -> int:
    """Install the fused path on every qualifying MoE decoder layer of `model`; returns how many."""
    layers = [layer for layer in getattr(getattr(model, "model", None), "layers", []) if moe_layer_qualifies(layer)]
    lib = _lib() if layers else None
    if lib is None:
        return 0
    shared = _Shared(lib)
    for layer in layers:
        layer.fast_path = FusedMoELayer(layer, shared)
    return len(layers)


def unfuse_moe_layers(model: Any) -> None:
    """Back to the per-op path (the reference) on the fused MoE layers."""
    for layer in getattr(getattr(model, "model", None), "layers", []):
        if isinstance(getattr(layer, "fast_path", None), FusedMoELayer):
            layer.fast_path = None
