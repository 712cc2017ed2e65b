"""A whole dense (Llama-shaped) decoder layer in one C call (`csrc/layer.c`) for CPU steps.

At batch 1 the per-op path of a layer is ~45 PyTorch dispatches plus Python; chained in C it is one ctypes
call. `fuse_cpu_layers(model)` installs `FusedCpuLayer` as the `fast_path` of every layer that qualifies:
all four linears packed (QuantizedLinear, or MixedQuantizedLinear: shards of different block types), float32,
no q/k norm, a plain float32 or bfloat16 KV cache or an int8 one (kv_quant.QuantizedKVCache: the C layer
quantizes K/V on write as write_kv_quantized does, and the attention kernel reads them with their scales).
Steps of up to `max_tokens` tokens (FUSED_MAX_TOKENS - 1, or fewer where the linears switch to a dense copy) run
in one call with the C attention kernel. Longer steps (prefill chunks), when the linears run bf16 panels (AMX
tiles, or vdpbf16ps on AVX512-BF16 CPUs) or int8 panels (a GGUF's blocks on VNNI CPUs without AMX), run as two C
calls around the attention backend's `attend` (bf16 for long chunks: the AMX prefill kernel, or SDPA): the C
linears then beat the dense GEMMs, and the step still saves ~40 dispatches per layer. Otherwise, and for an fp8
cache or tensors the kernel cannot take, it returns None and the layer runs its per-op path, which is the reference
the tests compare against.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional

import torch

from tokenmill.ops.attention.backend import CpuAttentionBackend
from tokenmill.ops.attention.kv_quant import QuantizedKVCache
from tokenmill.ops.cpu.attention import quantized_layout_error
from tokenmill.ops.cpu.build import load_library
from tokenmill.ops.cpu.qlinear import DIRECT_MAX_ROWS, QPANELS, QPARTS, QTYPES
from tokenmill.worker.forward_batch import ForwardBatch

# Steps of this many tokens or more leave the single call: on the AMX path they run as two C halves around the
# backend's attention (bf16 for long prefill chunks), otherwise the per-op path (dense GEMM copies).
FUSED_MAX_TOKENS = 64
POST_BLOCK = 512  # rows per block of the C post-attention half (csrc/layer.c POST_BLOCK): its workspace size
_ERRORS = {-1: "out of memory", -2: "block id out of range", -3: "unsupported KV dtype",
           -4: "inconsistent shapes", -6: "slot outside the KV cache", -7: "a linear rejected its arguments"}
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_ARGTYPES = [_P, _P, _I, _L, _L, _P, _P, _F, _I, _P, _P, _I, _P, _P, _I, _P, _P, _I, _P, _P, _I, _I, _I, _L,
             _P, _P, _P, _I, _P, _L, _I, _P, _P, _L, _L, _P, _P, _I, _F, _I, _L, _L, _P, _P]
_KV_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the plain KV caches the C layers write (attention.c's codes)
KV_INT8_CODE = 3  # an int8 QuantizedKVCache (the dense C layer writes it; attention.c's code)


def kv_args(kv_cache: Any) -> tuple[int, int, Optional[int]]:
    """(data pointer, attention.c's dtype code, scale pointer or None) of a cache step_inputs accepted."""
    if isinstance(kv_cache, QuantizedKVCache):
        return kv_cache.data.data_ptr(), KV_INT8_CODE, kv_cache.scale.data_ptr()
    return kv_cache.data_ptr(), _KV_CODES[kv_cache.dtype], None


@functools.lru_cache(maxsize=1)
def _lib() -> Optional[ctypes.CDLL]:
    lib = load_library("layer")
    if lib is not None:
        lib.tm_llama_layer.argtypes = _ARGTYPES
        lib.tm_llama_layer.restype = _I
        lib.tm_llama_layer_pre.argtypes = [_P, _P, _I, _L, _L, _P, _F, _I, _P, _P, _I, _I, _I, _P, _P, _P, _I, _P, _L,
                                           _I, _P, _L, _L, _P, _P]
        lib.tm_llama_layer_pre.restype = _I
        lib.tm_llama_layer_post.argtypes = [_P, _P, _L, _L, _P, _F, _I, _P, _P, _I, _P, _P, _I, _P, _P, _L, _L, _L, _L,
                                            _P, _P, _P]
        lib.tm_llama_layer_post.restype = _I
        lib.tm_amx_init.restype = _I
        lib.tm_lora_bf16_available.argtypes = []
        lib.tm_lora_bf16_available.restype = _I
        lib.tm_amx_init()  # this library's own AMX state (its layers are built with amx_min_rows only if granted)
    return lib


class TmLoRAProj(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("k", ctypes.c_int64), ("nslices", ctypes.c_int64),
                ("cols", ctypes.c_void_p), ("a16", ctypes.c_void_p), ("b16", ctypes.c_void_p)]


class TmLoRA(ctypes.Structure):
    """csrc/kernels.h tm_lora: a layer's LoRA buffers (qkv, o, gate_up, down) and the step's adapter row spans."""

    _fields_ = [("proj", TmLoRAProj * 4), ("num_groups", ctypes.c_int64), ("starts", ctypes.c_void_p),
                ("lens", ctypes.c_void_p), ("slots", ctypes.c_void_p)]


def lora_bf16_available() -> bool:
    """Whether the layer library has csrc/lora.c's bfloat16 kernel (built with AVX512-BF16)."""
    lib = _lib()
    return lib is not None and bool(lib.tm_lora_bf16_available())


class _StepMeta:
    """Pointers of one ForwardBatch's metadata as the kernel takes them, computed once per step."""

    def __init__(self, batch: ForwardBatch):
        self.batch = batch
        self.slots = batch.slot_mapping.to(torch.int64).contiguous()
        self.tables = batch.block_tables.to(torch.int32).contiguous()
        self.seq_lens = batch.seq_lens.to(torch.int32).contiguous()
        self.qsl = batch.query_start_loc.to(torch.int32).contiguous()
        self.num_reqs = batch.num_reqs
        self.ok = (self.tables.dim() == 2 and self.tables.shape[0] == self.num_reqs
                   and self.qsl.numel() == self.num_reqs + 1)


def linear_args(m: Any) -> tuple[int, int, Optional[int]]:
    """(qtype id, weight pointer, bias pointer) of a packed linear as the C layers' qlinear_any takes it: the
    parameters stay put after loading; a linear whose shards have different types (MixedQuantizedLinear) passes its
    row groups, one with AMX tiles made once (QuantizedLinear.pack_amx) its panels (kept alive by the module)."""
    if m.qtype == "mixed":
        qt, w = QPARTS, ctypes.addressof(m.qparts)
    elif m.qpanels is not None:
        qt, w = QPANELS, ctypes.addressof(m.qpanels)
    else:
        qt, w = QTYPES[m.qtype][0], m.weight.data_ptr()
    return qt, w, (m.bias.data_ptr() if m.bias is not None else None)


def _int8_cache_ok(kv_cache: Any) -> bool:
    """An int8 QuantizedKVCache in kv_quant.py's layout with contiguous data (the C layer writes it)."""
    return (kv_cache.kind == "int8" and kv_cache.data.is_contiguous()
            and quantized_layout_error(kv_cache) is None)


def step_inputs(shared: "_Shared", num_kv_heads: int, head_dim: int, h: torch.Tensor,
                residual: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, kv_cache: Any,
                batch: ForwardBatch, int8_kv: bool = False) -> Optional[tuple[_StepMeta, torch.Tensor, int]]:
    """The checks a fused layer (dense here, MoE in moe_layer.py) makes of one step's inputs: (the step's metadata,
    the residual (a new buffer when there is none yet), 1 if it holds a residual else 0), or None (the layer declines
    the step). int8_kv: the layer also takes an int8 QuantizedKVCache (kv_args gives its pointers)."""
    t = h.shape[0]
    if isinstance(kv_cache, QuantizedKVCache):
        if not (int8_kv and _int8_cache_ok(kv_cache)):
            return None
    elif type(kv_cache) is not torch.Tensor or kv_cache.dtype not in _KV_CODES or not kv_cache.is_contiguous():
        return None
    if (h.dtype != torch.float32 or not h.is_contiguous()
            or cos.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous()):
        return None
    if (len(kv_cache.shape) != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3] != num_kv_heads
            or kv_cache.shape[4] != head_dim or cos.shape != (t, head_dim) or sin.shape != cos.shape):
        return None
    meta = shared.meta(batch)
    if not meta.ok:
        return None
    if residual is None:
        return meta, torch.empty_like(h), 0
    if residual.dtype != torch.float32 or not residual.is_contiguous():
        return None
    return meta, residual, 1


class FusedCpuLayer:
    """The fast path of one dense DecoderLayer (see layer_qualifies); `__call__` returns (h, residual) or None
    (use the per-op path)."""

    def __init__(self, layer: Any, shared: "_Shared"):
        attn, mlp = layer.self_attn, layer.mlp
        self.shared = shared
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = float(attn.attn.scale)
        self.window = int(attn.attn.sliding_window or 0)
        self.hidden = layer.input_layernorm.weight.shape[0]
        self.inter = mlp.down_proj.in_features
        self.eps = float(layer.input_layernorm.eps)  # layer_qualifies: both norms share it
        lin = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        from tokenmill.model.layers.quantized import amx_switch_rows, dense_switch_rows

        # larger steps: the two halves (bf16 panel linears) or the per-op path (dense GEMM copies), bf16 attention
        # for long chunks
        self.max_tokens = min(dense_switch_rows(lin) or FUSED_MAX_TOKENS, FUSED_MAX_TOKENS) - 1
        self.amx_min_rows = amx_switch_rows(lin) or 0
        self.linears = [a for m in lin for a in linear_args(m)]
        self.ln1, self.ln2 = layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr()
        self.attn = attn.attn  # its backend attends the long steps between the two halves
        # a ctypes pointer to this layer's TmLoRA for a step with LoRA rows, set and cleared from outside
        # (tokenmill/lora/runtime.py); None: no LoRA term
        self.lora: Optional[Any] = None

    def __call__(self, h: torch.Tensor, residual: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 kv_cache: Any, batch: ForwardBatch) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        t = h.shape[0]
        split = t > self.max_tokens
        if split and not (self.amx_min_rows and isinstance(self.attn.backend, CpuAttentionBackend)):
            return None  # without bf16 panels the C linears lose to the dense copies at these sizes
        inputs = step_inputs(self.shared, self.num_kv_heads, self.head_dim, h, residual, cos, sin, kv_cache, batch,
                             int8_kv=True)
        if inputs is None:
            return None
        meta, residual, has_residual = inputs
        out = torch.empty_like(h)
        if split:
            return self._split(h, residual, has_residual, cos, sin, kv_cache, batch, meta, out)
        _, nb, bs, _, _ = kv_cache.shape
        kv_ptr, kv_code, kv_scale = kv_args(kv_cache)
        rc = self.shared.lib.tm_llama_layer(
            h.data_ptr(), residual.data_ptr(), has_residual, t, self.hidden, self.ln1, self.ln2, self.eps,
            *self.linears, self.num_heads, self.num_kv_heads, self.head_dim, self.inter,
            cos.data_ptr(), sin.data_ptr(), kv_ptr, kv_code, kv_scale, nb, bs,
            meta.slots.data_ptr(), meta.tables.data_ptr(), meta.tables.stride(0), meta.tables.shape[1], meta.seq_lens.data_ptr(),
            meta.qsl.data_ptr(), meta.num_reqs, self.scale, self.window, DIRECT_MAX_ROWS, self.amx_min_rows,
            self.lora, out.data_ptr())
        if rc != 0:
            raise ValueError(f"fused CPU layer: {_ERRORS.get(rc, f'error {rc}')}")
        return out, residual

    def _split(self, h: torch.Tensor, residual: torch.Tensor, has_residual: int, cos: torch.Tensor,
               sin: torch.Tensor, kv_cache: Any, batch: ForwardBatch, meta: "_StepMeta",
               out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A long step: the two C halves around the backend's attention (bf16 for long prefill chunks)."""
        t, lib = h.shape[0], self.shared.lib
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = torch.empty(t, nq + 2 * nkv)
        _, nb, bs, _, _ = kv_cache.shape
        (qt, w, b), rest = self.linears[:3], self.linears[3:]
        rc = lib.tm_llama_layer_pre(h.data_ptr(), residual.data_ptr(), has_residual, t, self.hidden, self.ln1,
                                    self.eps, qt, w, b, self.num_heads, self.num_kv_heads, self.head_dim,
                                    cos.data_ptr(), sin.data_ptr(), *kv_args(kv_cache), nb, bs, meta.slots.data_ptr(),
                                    DIRECT_MAX_ROWS, self.amx_min_rows, self.lora, qkv.data_ptr())
        if rc != 0:
            raise ValueError(f"fused CPU layer: {_ERRORS.get(rc, f'error {rc}')}")
        q = qkv[:, :nq].view(t, self.num_heads, self.head_dim)
        att = self.attn.backend.attend(q, kv_cache, batch, self.scale, self.attn.sliding_window)
        att = att.reshape(t, nq).contiguous()
        work = self.shared.work(min(t, POST_BLOCK) * (2 * self.hidden + 3 * self.inter))
        rc = lib.tm_llama_layer_post(att.data_ptr(), residual.data_ptr(), t, self.hidden, self.ln2, self.eps, *rest,
                                     nq, self.inter, DIRECT_MAX_ROWS, self.amx_min_rows, self.lora,
                                     work.data_ptr(), out.data_ptr())
        if rc != 0:
            raise ValueError(f"fused CPU layer: {_ERRORS.get(rc, f'error {rc}')}")
        return out, residual


class _Shared:
    """State shared by the fused layers of one model: the library and the current step's metadata."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self._meta: Optional[_StepMeta] = None
        self._work = torch.empty(0)

    def work(self, numel: int) -> torch.Tensor:
        """Scratch floats for the layers' intermediates, kept (at the largest size asked) across layers and steps."""
        if self._work.numel() < numel:
            self._work = torch.empty(numel)
        return self._work

    def meta(self, batch: ForwardBatch) -> _StepMeta:
        if self._meta is None or self._meta.batch is not batch:
            self._meta = _StepMeta(batch)
        return self._meta


def layer_qualifies(layer: Any) -> bool:
    """Whether `layer` can run fused, asked of what the layer is: a dense decoder layer (SelfAttention without
    q/k norm or clipping, a GatedMLP), packed linears, float32 norms. MoE layers never qualify."""
    from tokenmill.model.layers.attention import SelfAttention
    from tokenmill.model.layers.mlp import GatedMLP
    from tokenmill.model.layers.quantized import MixedQuantizedLinear, QuantizedLinear

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not isinstance(attn, SelfAttention) or not isinstance(mlp, GatedMLP):
        return False
    if attn.qk_norm is not None or attn.clip_qkv is not None:
        return False
    lin = [getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None), getattr(mlp, "gate_up_proj", None),
           getattr(mlp, "down_proj", None)]
    if not all(type(m) in (QuantizedLinear, MixedQuantizedLinear) and m.weight.device.type == "cpu" for m in lin):
        return False
    norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    if not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms):
        return False
    if layer.input_layernorm.eps != layer.post_attention_layernorm.eps or attn.head_dim % 2:
        return False
    return all(b is None or (b.dtype == torch.float32 and b.is_contiguous()) for b in (m.bias for m in lin))


def fuse_cpu_layers(model: Any) -> int:
    """Install the fused path on every qualifying decoder layer of `model`; returns how many."""
    layers = [layer for layer in getattr(getattr(model, "model", None), "layers", []) if layer_qualifies(layer)]
    lib = _lib() if layers else None
    if lib is None:
        return 0
    shared = _Shared(lib)
    for layer in layers:
        layer.fast_path = FusedCpuLayer(layer, shared)
    return len(layers)


def fused_switch_tokens(model: Any) -> Optional[int]:
    """Fewest tokens a step needs to leave the fused path (None: no layer of `model` is fused)."""
    caps = [layer.fast_path.max_tokens + 1 for layer in getattr(getattr(model, "model", None), "layers", [])
            if isinstance(getattr(layer, "fast_path", None), FusedCpuLayer)]
    return min(caps) if caps else None


def unfuse_cpu_layers(model: Any) -> None:
    """Back to the per-op path (the reference) on every layer."""
    for layer in getattr(getattr(model, "model", None), "layers", []):
        layer.fast_path = None
