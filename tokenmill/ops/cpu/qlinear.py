"""Matmul against GGUF-quantized weights kept packed: `qlinear(x, qweight, qtype, bias)`.

Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32 weights) and the k-quants Q4_K, Q5_K, Q6_K (super-blocks of 256
weights, 8 or 16 sub-blocks with 6- or 8-bit scales), the tensors of Q4_K_M / Q5_K_M / Q6_K files.
A weight [N, K] is held as its raw GGUF bytes, a uint8 tensor [N, K/QK * block_bytes] (row n = the blocks of
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

QK = 32  # weights per block of the legacy types (and per sub-block of the k-quants' scales/mins)
QK_K = 256  # weights per k-quant super-block
# name -> (kernel type id, bytes per block, weights per block); the ids are csrc/quant.h's enum
QTYPES: dict[str, tuple[int, int, int]] = {
    "q4_0": (0, 18, QK), "q4_1": (1, 20, QK), "q8_0": (2, 34, QK), "q5_0": (3, 22, QK), "q5_1": (4, 24, QK),
    "q4_k": (5, 144, QK_K), "q5_k": (6, 176, QK_K), "q6_k": (7, 210, QK_K),
    "bf16": (8, 64, QK), "f16": (9, 64, QK),  # 16-bit floats as they are (a "block": 32 of them, no scale)
}
# the 16-bit float "types": a bf16 / f16 checkpoint's weights kept in their own bytes (2 a weight), not blocks of
# small integers; the block types are the others
FLOAT16_QTYPES = ("bf16", "f16")
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
    lib.qlinear_any.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64]
    lib.qlinear_any.restype = ctypes.c_int
    lib.tm_qlinear_i8_direct.argtypes = []
    lib.tm_qlinear_i8_direct.restype = ctypes.c_int
    lib.tm_qlinear_amx_pack.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.tm_qlinear_amx_pack.restype = ctypes.c_int
    lib.tm_qlinear_amx_panel_words.argtypes = [i64, i64]
    lib.tm_qlinear_amx_panel_words.restype = i64
    lib.tm_qlinear_amx_pack_glu.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.tm_qlinear_amx_pack_glu.restype = ctypes.c_int
    lib.tm_qlinear_glu.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ptr, i64]
    lib.tm_qlinear_glu.restype = ctypes.c_int
    lib.tm_qlinear_bf16_available.argtypes = []
    lib.tm_qlinear_bf16_available.restype = ctypes.c_int
    lib.tm_qlinear_bf16_pack.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.tm_qlinear_bf16_pack.restype = ctypes.c_int
    lib.tm_qlinear_bf16_pack_glu.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.tm_qlinear_bf16_pack_glu.restype = ctypes.c_int
    lib.tm_qlinear_i8g_available.argtypes = []
    lib.tm_qlinear_i8g_available.restype = ctypes.c_int
    lib.tm_qlinear_i8g_bytes.argtypes = [i64, i64]
    lib.tm_qlinear_i8g_bytes.restype = i64
    lib.tm_qlinear_i8g_group.argtypes = [i64]
    lib.tm_qlinear_i8g_group.restype = i64
    lib.tm_qlinear_i8g_pack.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.tm_qlinear_i8g_pack.restype = ctypes.c_int
    lib.tm_qlinear_i8g_pack_glu.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.tm_qlinear_i8g_pack_glu.restype = ctypes.c_int
    return lib


QPARTS = -1  # qlinear_any's type for a QParts weight (csrc/kernels.h TM_QPARTS)
QPARTS_MAX = 4


class QParts(ctypes.Structure):
    """csrc/kernels.h tm_qparts: up to 4 packed row groups of different block types, outputs back to back."""
    _fields_ = [("n", ctypes.c_int64), ("qtype", ctypes.c_int64 * QPARTS_MAX), ("rows", ctypes.c_int64 * QPARTS_MAX),
                ("w", ctypes.c_void_p * QPARTS_MAX)]


def make_qparts(parts: list[tuple[str, torch.Tensor]]) -> QParts:
    """(qtype, packed uint8 [rows, row_bytes]) per group -> the struct the kernels take. It holds raw pointers:
    the caller keeps the tensors alive (and in place) while it is used."""
    if not 1 <= len(parts) <= QPARTS_MAX:
        raise ValueError(f"{len(parts)} row groups; the kernel takes 1 to {QPARTS_MAX}")
    st = QParts()
    st.n = len(parts)
    for i, (qtype, packed) in enumerate(parts):
        if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
            raise ValueError("row groups must be contiguous uint8 [rows, row_bytes] tensors")
        st.qtype[i], st.rows[i], st.w[i] = QTYPES[qtype][0], packed.shape[0], packed.data_ptr()
    return st


QPANELS = -2  # qlinear_any's type for a weight with its AMX panels (csrc/kernels.h TM_QPANELS)


class QPanels(ctypes.Structure):
    """csrc/kernels.h tm_qpanels: a packed weight and its AMX panels (the bf16 tiles the AMX path would dequantize
    on every call, made once). glu = I: a gate|up weight [2I, K] whose panels pair each 16 gates with their ups
    (amx_pack's glu), for the fused layer's silu(gate) * up epilogue. i8 = 1: `panels` is i8_pack's int8 buffer."""
    _fields_ = [("qtype", ctypes.c_int64), ("w", ctypes.c_void_p), ("panels", ctypes.c_void_p), ("glu", ctypes.c_int64),
                ("i8", ctypes.c_int64)]


def amx_panel_bytes(k: int, n: int) -> int:
    """Bytes of the AMX panels of an [n, k] weight: bfloat16 with n rounded up to 32 (2 bytes a weight)."""
    return (n + 31) // 32 * 32 * k * 2


def amx_pack(qweight: torch.Tensor, qtype: str, k: int, glu: int = 0) -> tuple[torch.Tensor, QPanels]:
    """The AMX panels of a packed weight [N, row_bytes] and the struct the kernels take (it holds raw pointers:
    the caller keeps both tensors alive and in place). Calls of the AMX path then read the panels, the same bf16
    values it would dequantize per call, so results are unchanged. glu = I (a multiple of 16, N = 2I): the weight
    is gate|up and its panels pair gates with their ups (same outputs; glu_linear can then fuse silu(gate) * up).
    Needs panels_available(qtype): without AMX, the panels (the same words) run the AVX512-BF16 kernel
    (csrc/qlinear_bf16.c), the same numerics."""
    lib = _lib()
    if lib is None or not panels_available(qtype):
        raise RuntimeError(f"neither the AMX path nor the AVX512-BF16 {qtype} path is available on this machine")
    n = _check_panel_source(qweight, qtype, k, glu)
    panels = torch.empty(lib.tm_qlinear_amx_panel_words(k, n), dtype=torch.int32)
    pack, pack_glu = ((lib.tm_qlinear_amx_pack, lib.tm_qlinear_amx_pack_glu) if amx_available()
                      else (lib.tm_qlinear_bf16_pack, lib.tm_qlinear_bf16_pack_glu))
    rc = (pack_glu(QTYPES[qtype][0], qweight.data_ptr(), k, glu, panels.data_ptr()) if glu
          else pack(QTYPES[qtype][0], qweight.data_ptr(), k, n, panels.data_ptr()))
    if rc == -3:
        raise MemoryError(f"out of memory packing the bf16 panels of a {qtype} weight (K={k})")
    if rc != 0:
        raise ValueError(f"the bf16 panel packer rejected its arguments ({qtype}, K={k})")
    st = QPanels()
    st.qtype, st.w, st.panels, st.glu = QTYPES[qtype][0], qweight.data_ptr(), panels.data_ptr(), glu
    return panels, st


def i8_group(k: int) -> int:
    """k's per group of i8_pack's scales (csrc/qlinear_i8gemm.c): 64 where it divides k, else 32."""
    return 64 if k % 64 == 0 else 32


def i8_panel_bytes(k: int, n: int) -> int:
    """Bytes of i8_pack's buffer for an [n, k] weight: int8 with n rounded up to 32 (1 byte a weight), plus a float
    scale and an int32 correction per 16 outputs and group."""
    n32 = (n + 31) // 32 * 32
    return n32 * k + n32 * (k // i8_group(k)) * 8


@functools.lru_cache(maxsize=None)
def i8gemm_available() -> bool:
    """True when the kernel was built with AVX512-VNNI (csrc/qlinear_i8gemm.c: the int8 panels of i8_pack)."""
    lib = _lib()
    return lib is not None and bool(lib.tm_qlinear_i8g_available())


def _check_panel_source(qweight: torch.Tensor, qtype: str, k: int, glu: int) -> int:
    """Rows N of a packed weight [N, row_bytes] that a panel packer (amx_pack, i8_pack) takes; ValueError if not."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError("expected a contiguous packed uint8 [N, row_bytes] weight")
    n = qweight.shape[0]
    if qweight.shape[1] != row_bytes(qtype, k):
        raise ValueError(f"packed weight has {qweight.shape[1]} bytes per row, {qtype} with K={k} needs "
                         f"{row_bytes(qtype, k)}")
    if glu and (glu % 16 or n != 2 * glu):
        raise ValueError(f"glu panels need a gate|up weight of 2 x a multiple of 16 rows, got {n} rows, glu={glu}")
    return n


def i8_pack(qweight: torch.Tensor, qtype: str, k: int, glu: int = 0) -> tuple[torch.Tensor, QPanels]:
    """The int8 panels of a packed block-quantized weight [N, row_bytes] (csrc/qlinear_i8gemm.c: W dequantized,
    then requantized to int8 per output and group of i8_group(k) k's) and the struct the kernels take (raw pointers:
    the caller keeps both tensors alive and in place). Calls of amx_min_rows+ rows then run an int8 GEMM (x rounded
    per row and group to 8 bits); fewer rows read the packed blocks. glu = I: gate|up pairs as amx_pack's."""
    lib = _lib()
    if lib is None or not i8gemm_available():
        raise RuntimeError("the AVX512-VNNI int8 panels are not available on this machine")
    if qtype not in QTYPES or qtype in FLOAT16_QTYPES:
        raise ValueError(f"int8 panels are made from block-quantized weights, not {qtype!r}")
    n = _check_panel_source(qweight, qtype, k, glu)
    buf = torch.empty(lib.tm_qlinear_i8g_bytes(k, n), dtype=torch.uint8)
    rc = (lib.tm_qlinear_i8g_pack_glu(QTYPES[qtype][0], qweight.data_ptr(), k, glu, buf.data_ptr()) if glu
          else lib.tm_qlinear_i8g_pack(QTYPES[qtype][0], qweight.data_ptr(), k, n, buf.data_ptr()))
    if rc == -3:
        raise MemoryError(f"out of memory packing the int8 panels of a {qtype} weight (K={k})")
    if rc != 0:
        raise ValueError(f"the int8 panel packer rejected its arguments ({qtype}, K={k})")
    st = QPanels()
    st.qtype, st.w, st.panels, st.glu, st.i8 = QTYPES[qtype][0], qweight.data_ptr(), buf.data_ptr(), glu, 1
    return buf, st


def glu_linear(x: torch.Tensor, qpanels: QPanels, bias: Optional[torch.Tensor] = None,
               amx_min_rows: int = 1) -> Optional[torch.Tensor]:
    """silu(g) * u for [g | u] = x @ W^T (+ bias) in one AMX pass from amx_pack(..., glu=I)'s struct (the fused
    layer's epilogue, csrc tm_qlinear_glu): float32 [M, I], or None where the kernel does not take it (fewer than
    amx_min_rows rows, no AMX, no glu panels)."""
    lib = _lib()
    if lib is None or qpanels.glu <= 0:
        return None
    i = int(qpanels.glu)
    x2 = x.float().contiguous()
    act = torch.empty(x2.shape[0], i)
    if bias is not None:
        bias = bias.float().contiguous()
    rc = lib.tm_qlinear_glu(QPANELS, x2.data_ptr(), x2.shape[0], x2.shape[1], ctypes.addressof(qpanels), i,
                            bias.data_ptr() if bias is not None else None, act.data_ptr(), amx_min_rows)
    if rc < 0:
        raise ValueError("tm_qlinear_glu failed")
    return act if rc == 1 else None


def qlinear_parts(x: torch.Tensor, parts: list[tuple[str, torch.Tensor]], qparts: Optional[QParts] = None,
                  bias: Optional[torch.Tensor] = None, direct_max_rows: int = DIRECT_MAX_ROWS,
                  amx_min_rows: int = 0) -> torch.Tensor:
    """x [..., K] @ [dequantize(p) for p in parts].T concatenated (+ bias) -> [..., sum of rows]: one kernel call
    writing each group's columns (`qparts`: make_qparts(parts), built once by the caller)."""
    k = x.shape[-1]
    n = sum(p.shape[0] for _, p in parts)
    lib = _lib()
    if lib is None or x.device.type != "cpu":
        w = torch.cat([dequantize(p, qt, k) for qt, p in parts])
        return torch.nn.functional.linear(x.float(), w, bias)
    for qt, p in parts:
        if k % QTYPES[qt][2] or p.shape[1] != row_bytes(qt, k):
            raise ValueError(f"packed weight has {p.shape[1]} bytes per row, {qt} with K={k} needs "
                             f"{row_bytes(qt, k) if k % QTYPES[qt][2] == 0 else 'whole blocks'}")
    st = qparts if qparts is not None else make_qparts(parts)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    if lib.qlinear_any(QPARTS, x2.data_ptr(), x2.shape[0], k, ctypes.addressof(st), n,
                       bias.data_ptr() if bias is not None else None, y.data_ptr(), direct_max_rows, amx_min_rows) != 0:
        raise ValueError(f"qlinear kernel rejected its arguments ({[qt for qt, _ in parts]}, K={k})")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def available() -> bool:
    """True when the compiled kernel loads on this machine."""
    return _lib() is not None


@functools.lru_cache(maxsize=None)
def amx_available() -> bool:
    """True when the kernel was built with the AMX bf16 path and Linux grants this process the tile state."""
    lib = _lib()
    return lib is not None and bool(lib.tm_amx_init())


@functools.lru_cache(maxsize=None)
def bf16_dot_available() -> bool:
    """True when the kernel was built with AVX512-BF16 (csrc/qlinear_bf16.c: a 16-bit weight's AMX-layout panels
    run with vdpbf16ps, for CPUs without the tile unit)."""
    lib = _lib()
    return lib is not None and bool(lib.tm_qlinear_bf16_available())


def panels_available(qtype: str) -> bool:
    """Whether amx_pack's panels of a qtype weight can be made and run here: any type on an AMX CPU or an
    AVX512-BF16 one (bf16_dot_available)."""
    return qtype in QTYPES and (amx_available() or bf16_dot_available())


def i8_direct_available() -> bool:
    """True when gemm auto's direct path (1-3 rows) for the k-quants quantizes x to int8 (an AVX512-VNNI build;
    calls with amx_min_rows > 0 take it): exactly the dequantized weights times x rounded per 32 values to
    int8 with one float scale, llama.cpp's decode arithmetic; float32 GEMMs (amx_min_rows 0) stay exact."""
    lib = _lib()
    return lib is not None and bool(lib.tm_qlinear_i8_direct())


def block_size(qtype: str) -> int:
    """Weights per block of qtype (32, or 256 for the k-quants): row lengths must be a multiple of it."""
    if qtype not in QTYPES:
        raise ValueError(f"unsupported quantization type {qtype!r}; expected one of {', '.join(QTYPES)}")
    return QTYPES[qtype][2]


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one packed row of k weights."""
    qk = block_size(qtype)
    if k % qk:
        raise ValueError(f"row length {k} is not a multiple of the block size {qk}")
    return k // qk * QTYPES[qtype][1]


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields (last dim 2 bytes) -> float32, the last dim kept as 1."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [..., n] -> its fields of `width` bits, lowest first: [..., n, 8 // width] (as uint8)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return (b.unsqueeze(-1) >> shifts) & ((1 << width) - 1)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 12 packed bytes [..., 12] -> 8 six-bit scales and 8 six-bit mins, each [..., 8] float."""
    d, m, md = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale.float(), mins.float()


def dequantize(qweight: torch.Tensor, qtype: str, k: int) -> torch.Tensor:
    """Reference: packed uint8 [N, row_bytes] -> float32 [N, k] (the gguf package's math and float32 operation
    order, in torch: equal to gguf.quants.dequantize bit for bit)."""
    n = qweight.shape[0]
    qk = block_size(qtype)
    if qtype in FLOAT16_QTYPES:
        return qweight.contiguous().view(torch.bfloat16 if qtype == "bf16" else torch.float16).float().reshape(n, k)
    blocks = qweight.reshape(n, k // qk, QTYPES[qtype][1])  # [N, nb, bytes]
    if qtype in ("q4_k", "q5_k", "q6_k"):
        return _dequantize_k(blocks, qtype).reshape(n, k)
    d = _f16(blocks[..., 0:2])  # [N, nb, 1]
    if qtype == "q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(n, k)
    qs = blocks[..., {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8}[qtype]:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [N, nb, 32] uint8: low nibbles, then high
    if qtype in ("q5_0", "q5_1"):  # weight j's fifth bit: bit j of the little-endian 32-bit qh
        qh = blocks[..., (2 if qtype == "q5_0" else 4):][..., :4]
        q = q | (_bits(qh, 1).reshape(n, -1, QK) << 4)
    q = q.float()
    if qtype in ("q4_1", "q5_1"):
        return (d * q + _f16(blocks[..., 2:4])).reshape(n, k)
    return (d * (q - (8.0 if qtype == "q4_0" else 16.0))).reshape(n, k)


def _dequantize_k(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Super-blocks [N, nb, bytes] -> float32 [N, nb, 256].

    Q4_K (144 B): f16 d, f16 dmin, 12 B of 6-bit scales/mins, 128 B nibbles: 32 bytes hold sub-blocks 2j (low
      nibbles) and 2j+1 (high); w = d*sc[s] * q - dmin*m[s].
    Q5_K (176 B): as Q4_K with 32 B qh between scales and nibbles: bit s of qh[l] is the fifth bit of sub-block s's
      weight l.
    Q6_K (210 B): 128 B low nibbles, 64 B two-bit highs, 16 int8 scales (one per 16 weights), f16 d at the end;
      each 128-weight half h: weight 32t + l (t < 4) has low nibble (ql[64h + 32(t&1) + l] >> 4(t>>1)) and high
      bits (qh[32h + l] >> 2t) & 3; w = d*scale * (q - 32)."""
    n, nb, _ = blocks.shape
    if qtype == "q6_k":
        ql = blocks[..., :128].reshape(n, nb, 2, 1, 2, 32)  # [half, shift, c, l]
        ql = (ql >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 1, 2, 1, 1)) & 0x0F
        qh = _bits(blocks[..., 128:192].reshape(n, nb, 2, 32), 2).permute(0, 1, 2, 4, 3)  # [half, t, l]
        q = (ql.reshape(n, nb, 2, 4, 32) | (qh << 4)).to(torch.int8) - 32  # [N, nb, half, t, l]
        scale = blocks[..., 192:208].contiguous().view(torch.int8).float()  # [N, nb, 16]
        dl = (_f16(blocks[..., 208:210]) * scale).reshape(n, nb, 16, 1)
        return (dl * q.reshape(n, nb, 16, 16).float()).reshape(n, nb, QK_K)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # [N, nb, 1]
    sc, mn = _k_scale_min(blocks[..., 4:16])
    qs = blocks[..., -128:].reshape(n, nb, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(n, nb, 8, 32)  # sub-block 2j: low nibbles, 2j+1: high
    if qtype == "q5_k":
        q = q | (_bits(blocks[..., 16:48], 1).transpose(-1, -2) << 4)  # [N, nb, 32 l, 8 s] -> [N, nb, 8, 32]
    dl = (d * sc).reshape(n, nb, 8, 1)
    ml = (dmin * mn).reshape(n, nb, 8, 1)
    return (dl * q.float() - ml).reshape(n, nb, QK_K)


def qlinear(x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: Optional[torch.Tensor] = None,
            direct_max_rows: int = DIRECT_MAX_ROWS, amx_min_rows: int = 0,
            qpanels: Optional[QPanels] = None) -> torch.Tensor:
    """x [..., K] float32 @ dequantize(qweight).T (+ bias) -> [..., N] float32.

    Calls with at most direct_max_rows rows use the kernel's register path, larger ones its buffered one.
    amx_min_rows > 0 (only where amx_available()): calls with at least that many rows use the AMX path, which
    rounds weights and activations to bfloat16 (the `gemm_dtype` bfloat16 numerics), summing in float32; and
    direct-path calls on k-quant weights take int8 activations where i8_direct_available(). With `qpanels`
    (amx_pack of this qweight), the AMX calls read its panels instead of dequantizing the weight."""
    n, nbytes = qweight.shape
    k = x.shape[-1]
    lib = _lib()
    if lib is None or x.device.type != "cpu":
        return torch.nn.functional.linear(x.float(), dequantize(qweight, qtype, k), bias)
    kind, block, qk = QTYPES[qtype]
    if k % qk or nbytes != k // qk * block:
        raise ValueError(f"packed weight has {nbytes} bytes per row, {qtype} with K={k} needs {row_bytes(qtype, k)}")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    call, kind, w = ((lib.qlinear_any, QPANELS, ctypes.addressof(qpanels)) if qpanels is not None
                     else (lib.qlinear_f32, kind, qweight.data_ptr()))
    if call(kind, x2.data_ptr(), m, k, w, n, bias.data_ptr() if bias is not None else None, y.data_ptr(),
            direct_max_rows, amx_min_rows) != 0:
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
