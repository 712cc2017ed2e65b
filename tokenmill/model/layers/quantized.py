"""Layers whose weights stay GGUF-quantized (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks, the k-quants Q4_K / Q5_K /
Q6_K; uint8) and run with the CPU kernel.

`quantize_modules(model, types)` swaps the model's Linear / embedding / LM-head modules for these before the
loader fills them: the loader then copies raw block rows (`iter_gguf_weights(..., raw=...)`) instead of
dequantized floats. Row-wise packing keeps merged q|k|v and gate|up simple: shard rows are concatenated,
which needs every shard of one module to have the same block type; a merged module whose shards differ (a Q4_K_M
file's Q4_K q/k with a Q6_K v) is a `MixedQuantizedLinear`, one packed matrix per shard.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.layers.embedding import LMHead, VocabEmbedding
from tokenmill.model.layers.linear import Linear, MergedLinear, ShardId
from tokenmill.ops.cpu.qlinear import (FLOAT16_QTYPES, QPARTS_MAX, QTYPES, QPanels, QParts, amx_available,
                                      amx_pack, amx_panel_bytes, bf16_dot_available, block_size, dequantize,
                                      dequantize_rows, i8_pack, i8_panel_bytes, i8gemm_available, make_qparts,
                                      qlinear, qlinear_parts, row_bytes)

# Calls with at least this many rows (prefill chunks, 64+ decode batches) use a dense copy of the weight (float32
# for MKL sgemm, or bfloat16 for oneDNN's AMX / AVX512-BF16 kernels) instead of the packed kernel (None: never,
# no copy kept). Measured on the 2-core AVX2 box, SmolLM2-135M, 1 thread: 16 decoding requests 107 gen tok/s
# with the kernel vs 82 with sgemm; 64 requests 125.5 vs 126.3 (a tie); prefill of 16 x 200 tokens (2048-row
# chunks) 12.4 s with the kernel vs 9.1 s with sgemm.
DEFAULT_DENSE_MIN_ROWS: Optional[int] = 64
# The dense copies are kept only while they total at most this much (a 7B model would need ~28 GB in float32):
# above it every call runs the kernel, and prefill is slower instead.
DENSE_COPY_MAX_BYTES = 2 << 30
# With `gemm_dtype` bfloat16 on a CPU with AMX, calls of at least this many rows run the kernel's AMX path
# (weights dequantized to bf16 tiles on the fly) and no dense copy is kept: `bench/cpu_gemm.py` (SmolLM2 shapes,
# 30 layers, 2 threads) 4 rows 15.5 vs 16.3 ms, 16 rows 16.3 vs 23.9 ms, 64 rows 35.9 vs 82.8 ms (packed float32
# kernel), 512 rows 81 ms in C vs ~100-120 ms for oneDNN's bf16 GEMM on the dense copy.
AMX_MIN_ROWS = 4
# Without AMX, a bf16 / f16 checkpoint's linears (cpu_packs_16bit) run the same panels with AVX512-BF16's
# vdpbf16ps (csrc/qlinear_bf16.c) from this many rows, the head from BF16_DOT_HEAD_MIN_ROWS. `bench/bf16_gemm.py`
# (Zen 4 box, 2 threads, SmolLM2 shapes, ms per layer of 4 linears / per head call; packed float32 kernel / vdpbf16ps
# / oneDNN bf16, bench/results/s22 bf16zen_gemm.txt): 1 row 0.35 / 0.21 / 0.65, 4 rows 0.53 / 0.28 / 0.81, 16 rows
# 1.21 / 0.49 / 0.96, 64 rows 3.34 / 1.50 / 2.09, 256 rows - / 5.6 / 5.7, 2000 rows - / 43.2 / 38.4; head 1 row
# 1.9 / 0.94 / 4.0, 16 rows 8.4 / 3.2 / 6.5, 64 rows 27 / 11 / 13, 2000 rows - / 421 / 465. With x interleaved per
# row block (bf16zen_gemm2.txt): 64 rows 1.41 vs 2.09, 2000 rows 40.4 vs 39.1 (oneDNN 3% ahead only there: no dense
# copy is kept for it). So from one row (x then rounded to bf16, as the bfloat16 model rounds it).
BF16_DOT_MIN_ROWS = 1
BF16_DOT_HEAD_MIN_ROWS = 1
# A GGUF's block-quantized linears (and head) keep 1-3-row calls on the packed blocks (4-5 bits a weight against the
# panels' 16: SmolLM2 Q4_1 layers + Q8_0 head, one row, 5.2 ms a step packed vs ~7.4 on the panels,
# bench/results/s22 i8dense_rows_v1.txt and bf16zen_gemm.txt) and take the panels from 4 rows.
BF16_DOT_QUANT_MIN_ROWS = 4
# With gemm auto (or int8) on an AVX512-VNNI CPU without AMX, a GGUF's block-quantized linears and head take int8
# panels (csrc/qlinear_i8gemm.c: 1 byte a weight, vpdpbusd) IN PLACE OF the bf16 panels, from I8_MIN_ROWS rows
# (I8_HEAD_MIN_ROWS for the head); 16-bit checkpoints stay on the bf16 panels. `bench/i8_gemm.py` (Zen 4 box, 2
# threads, SmolLM2 shapes, Q4_1 layers / Q8_0 head, ms per layer of 4 linears / per head call; packed / bf16 panels /
# int8 panels, bench/results/s23 i8gemm_micro.txt, 30 layers): layer 1 row 0.148 / 0.266 / 0.158, 2 rows 0.206 /
# 0.254 / 0.163, 3 rows 0.286 / 0.289 / 0.175, 4 rows 0.367 / 0.271 / 0.183, 8 rows 0.59 / 0.32 / 0.24, 16 rows
# 0.98 / 0.47 / 0.35, 64 rows 3.17 / 1.29 / 0.82, 256 rows - / 4.87 / 2.79, 2000 rows - / 38.5 / 23.9; head 1 row
# 0.91 / 1.30 / 0.44, 4 rows 3.2 / 2.1 / 0.92, 16 rows 7.6 / 3.9 / 2.7, 64 rows 24.7 / 11.1 / 8.3, 2000 rows
# - / 408 / 335. 1-3 rows stay on the packed blocks as with the bf16 panels (x kept exact at batch 1-3; the int8
# panels would win from 2 rows, the head from 1: not taken here).
I8_MIN_ROWS = 4
I8_HEAD_MIN_ROWS = 4
# The LM head (SmolLM2: Q8_0, 49152 x 576) takes the AMX path from this many rows: 2 threads, min of 5 runs,
# 8 rows 3.4 ms (AMX) vs 3.2 (packed float32), 12 rows 3.4 vs 6.6, 16 rows 3.9 vs 9.3, 64 rows 10.6 vs 40.1.
HEAD_AMX_MIN_ROWS = 10
# A MoE layer's packed experts under gemm auto on an AMX CPU (csrc/moe.c): an expert given 1..MOE_I8_MAX_ROWS rows
# in a step takes int8 activations (the VNNI tiles below MOE_AMX_I8_MIN_ROWS rows, else the AMX int8 tiles), more
# rows (from MOE_AMX_MIN_ROWS) the AMX bf16 tiles. `bench/moe_rows.py` (OLMoE's 64 experts of 2048 x 1024, Q4_K
# gate|up, Q6_K down, every expert m rows, 2 threads, ms per layer, VNNI / AMX int8, bench/results/s19): m=4 22 / 36,
# m=8 29 / 37, m=10 37 / 41, m=12 43 / 43, m=16 54 / 46 (the VNNI tiles read each weight once for up to 8 rows);
# earlier (s18, AMX int8 / AMX bf16): m=32 117 / 141, m=48 161 / 163 (a loaded box); m=64 (quiet) 149 / 121.
MOE_I8_MAX_ROWS = 48
MOE_AMX_I8_MIN_ROWS = 12
MOE_AMX_MIN_ROWS = AMX_MIN_ROWS
# Without AMX (Zen 4: AVX512-VNNI / BF16) an expert's 1..MOE_DOT_MIN_ROWS - 1 rows take the VNNI int8 tiles (up to 8
# rows a pass over the weights, more rows more passes), more rows (prefill) the AVX512-BF16 panels, dequantized per
# task into a per-thread buffer (no bf16 copy of the experts is kept). bench/moe_rows.py on the Zen 4 box (2 threads,
# ms per layer, every expert m rows, float32 / VNNI / bf16 panels, bench/results/s23 moezen_rows_v3.txt): m=1 20.5 /
# 9.3 / 60 (the panels' dequantizing), m=8 73 / 29 / 75, m=16 150 / 60 / 96, m=32 197 / 124 / 128, m=48 304 / 206 /
# 169, m=64 457 / 297 / 227, m=128 776 / 550 / 362, m=256 1490 / 1175 / 688.
MOE_DOT_MIN_ROWS = 40


def moe_switch_rows() -> tuple[int, int, int]:
    """(amx_min_rows, i8_max_rows, amx_i8_min_rows) of packed experts under gemm auto: on an AMX CPU the AMX bf16
    tiles from amx_min_rows, the AMX int8 tiles from amx_i8_min_rows; without AMX, amx_min_rows is where the
    AVX512-BF16 panels take over from the VNNI tiles (kernels built without either keep float32 there)."""
    if amx_available():
        return MOE_AMX_MIN_ROWS, MOE_I8_MAX_ROWS, MOE_AMX_I8_MIN_ROWS
    return MOE_DOT_MIN_ROWS, MOE_DOT_MIN_ROWS - 1, 0


def cpu_has_bf16_matmul() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16) that oneDNN uses."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


def resolve_gemm_dtype(name: str) -> torch.dtype:
    """`gemm_dtype` config value -> the dense copy's torch dtype (auto: bfloat16 where the CPU runs it fast; int8:
    bfloat16 too, for what does not take the int8 panels: 16-bit weights, long prefill attention)."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    if name in ("float32", "bfloat16"):
        return getattr(torch, name)
    if name == "int8":
        return torch.bfloat16
    raise ValueError(f"unknown gemm_dtype {name!r}; choose auto, float32, bfloat16 or int8")


def gemm_int8(name: str) -> bool:
    """Whether `gemm_dtype` name gives a GGUF's block-quantized linears int8 panels (i8_pack) where they would get
    bf16 panels: int8 asks for them (an AVX512-VNNI build needed: a clear error otherwise); auto takes them on a
    VNNI CPU without AMX (AMX CPUs keep their tile paths)."""
    if name == "int8":
        if not i8gemm_available():
            raise ValueError("gemm_dtype int8 needs the CPU kernels built with AVX512-VNNI (not this machine)")
        return True
    return name == "auto" and not amx_available() and i8gemm_available()


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W [out, in] kept as packed GGUF blocks: weight is uint8 [out, row_bytes(in)].

    output_sizes / shard_names pack several checkpoint matrices along the output dim (like MergedLinear).
    """

    def __init__(self, in_features: int, output_sizes: list[int], qtype: str, bias: bool = False,
                 shard_names: Optional[list[ShardId]] = None,
                 dense_min_rows: Optional[int] = DEFAULT_DENSE_MIN_ROWS):
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(output_sizes)
        self.output_sizes = list(output_sizes)
        self.qtype = qtype
        self.dense_min_rows = dense_min_rows
        self.weight_dense: Optional[torch.Tensor] = None  # [out, in] float32 or bfloat16, built by finalize()
        self.amx_min_rows = 0  # > 0: calls of at least this many rows take the kernel's AMX bf16 path
        # the AMX path's bf16 tiles made once (pack_amx), which its calls then read instead of dequantizing
        self.panels: Optional[torch.Tensor] = None
        self.qpanels: Optional[QPanels] = None
        self.shard_names: Optional[list[ShardId]] = list(shard_names) if shard_names else None
        self.weight = nn.Parameter(torch.empty(self.out_features, row_bytes(qtype, in_features), dtype=torch.uint8),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=torch.float32), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        if self.shard_names is not None:
            for p in (self.weight, self.bias):
                if p is not None:
                    p.shard_ids = list(self.shard_names)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.weight and loaded.dtype != torch.uint8:
            raise ValueError(f"expected packed {self.qtype} blocks (uint8), got {loaded.dtype}")
        if self.shard_names is None:
            if shard_id is not None:
                raise ValueError(f"parameter is not packed, got shard {shard_id!r}")
            target = param.data
        else:
            if shard_id not in self.shard_names:
                raise ValueError(f"unknown shard {shard_id!r} (expected one of {self.shard_names})")
            i = self.shard_names.index(shard_id)
            target = param.data.narrow(0, sum(self.output_sizes[:i]), self.output_sizes[i])
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, checkpoint {tuple(loaded.shape)}")
        target.copy_(loaded)

    def finalize(self, dense_dtype: torch.dtype = torch.float32, amx: bool = False,
                 amx_min_rows: int = AMX_MIN_ROWS) -> None:
        """After loading: with amx (bf16 on an AMX CPU, or a 16-bit weight's AVX512-BF16 panels) the kernel's bf16
        panel path takes calls of amx_min_rows+ rows and no copy is kept; otherwise keep a dense copy for large-M
        calls when dense_min_rows asks for one."""
        self.weight_dense = None
        self.panels = self.qpanels = None
        self.amx_min_rows = amx_min_rows if amx else 0
        if amx:
            self.dense_min_rows = None
        elif self.dense_min_rows is not None:
            self.weight_dense = self.dequantized().to(dense_dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight as float32 [out, in] (the reference dequantizer)."""
        return dequantize(self.weight.data, self.qtype, self.in_features)

    def pack_amx(self, glu: int = 0, int8: bool = False) -> None:
        """Keep the AMX path's bf16 tiles of the weight (2 bytes a weight, amx_panel_bytes) so its calls stop
        dequantizing: one layer of SmolLM2 at 64 rows ran ~0.65 ms, of which most was making the tiles. glu = I:
        this is a gate|up linear, its tiles pair each 16 gates with their ups (the fused layer then writes
        silu(gate) * up from the accumulators; this module's outputs are unchanged). int8: the int8 panels
        instead (i8_pack, 1 byte a weight; a block-quantized weight on an AVX512-VNNI CPU)."""
        pack = i8_pack if int8 else amx_pack
        self.panels, self.qpanels = pack(self.weight.data, self.qtype, self.in_features, glu=glu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx_min_rows:
            return qlinear(x, self.weight, self.qtype, self.bias, amx_min_rows=self.amx_min_rows,
                           qpanels=self.qpanels)
        w = self.weight_dense
        if w is not None and x.shape[0] >= self.dense_min_rows:
            if w.dtype == x.dtype:
                return F.linear(x, w, self.bias)
            y = F.linear(x.to(w.dtype), w).to(x.dtype)  # bf16 inputs, fp32 accumulation, bf16 output
            return y + self.bias if self.bias is not None else y
        return qlinear(x, self.weight, self.qtype, self.bias)  # [T, in] -> [T, out]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, qtype={self.qtype}"


class MixedQuantizedLinear(QuantizedLinear):
    """A merged linear (q|k|v, gate|up) whose shards have different block types: `weight` is the shards' packed
    rows back to back, flat uint8 [sum of rows_i * row_bytes(qtype_i, in)]; each shard runs the kernel on its own
    rows into its columns of the output, in one kernel call (`qparts`: the groups as the C kernels take them, also
    by the fused C decoder layer); the dense copy / AMX choices as QuantizedLinear."""

    def __init__(self, in_features: int, output_sizes: list[int], qtypes: list[str], bias: bool = False,
                 shard_names: Optional[list[ShardId]] = None,
                 dense_min_rows: Optional[int] = DEFAULT_DENSE_MIN_ROWS):
        if len(qtypes) != len(output_sizes) or not 2 <= len(qtypes) <= QPARTS_MAX:
            raise ValueError(f"need one block type per shard (2 to {QPARTS_MAX} shards), got {qtypes} for "
                             f"{len(output_sizes)} shards")
        super().__init__(in_features, output_sizes, qtypes[0], bias, shard_names, dense_min_rows)
        self.qtype = "mixed"
        self.qtypes = list(qtypes)
        # per shard: (qtype, first byte, rows, bytes per row, first output)
        self.parts: list[tuple[str, int, int, int, int]] = []
        start = out = 0
        for qt, rows in zip(self.qtypes, self.output_sizes):
            rb = row_bytes(qt, in_features)
            self.parts.append((qt, start, rows, rb, out))
            start, out = start + rows * rb, out + rows
        self.weight = nn.Parameter(torch.empty(start, dtype=torch.uint8), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if self.shard_names is not None:
            self.weight.shard_ids = list(self.shard_names)
        self._qparts: Optional[tuple[int, QParts]] = None  # (weight's data_ptr, struct): rebuilt if it moves

    def groups(self) -> list[tuple[str, torch.Tensor]]:
        """(qtype, packed rows [rows, row_bytes]) per shard, views of `weight`."""
        return [(qt, self._packed(i)) for i, (qt, *_) in enumerate(self.parts)]

    @property
    def qparts(self) -> QParts:
        """The shards as csrc/kernels.h's tm_qparts (raw pointers into `weight`)."""
        ptr = self.weight.data_ptr()
        if self._qparts is None or self._qparts[0] != ptr:
            self._qparts = (ptr, make_qparts(self.groups()))
        return self._qparts[1]

    def _packed(self, i: int) -> torch.Tensor:
        _, start, rows, rb, _ = self.parts[i]
        return self.weight.data[start:start + rows * rb].view(rows, rb)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is not self.weight:
            return super().weight_loader(param, loaded, shard_id)
        if shard_id not in (self.shard_names or []):
            raise ValueError(f"unknown shard {shard_id!r} (expected one of {self.shard_names})")
        i = self.shard_names.index(shard_id)
        if loaded.dtype != torch.uint8:
            raise ValueError(f"expected packed {self.qtypes[i]} blocks (uint8), got {loaded.dtype}")
        target = self._packed(i)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, checkpoint {tuple(loaded.shape)}")
        target.copy_(loaded)

    def dequantized(self) -> torch.Tensor:
        return torch.cat([dequantize(self._packed(i), qt, self.in_features) for i, (qt, *_) in enumerate(self.parts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_dense
        if w is not None and not self.amx_min_rows and x.shape[0] >= self.dense_min_rows:
            return super().forward(x)  # the dense copy
        return qlinear_parts(x, self.groups(), self.qparts, self.bias, amx_min_rows=self.amx_min_rows)  # [T, out]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, qtypes={self.qtypes}"


class QuantizedEmbedding(nn.Module):
    """Token embedding over packed rows: a lookup dequantizes only the looked-up rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.qtype = qtype
        self.weight = nn.Parameter(torch.empty(num_embeddings, row_bytes(qtype, embedding_dim), dtype=torch.uint8),
                                   requires_grad=False)
        self.weight.weight_loader = _packed_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight, self.qtype, self.embedding_dim, input_ids)  # [T] -> [T, D]


class QuantizedLMHead(nn.Module):
    """hidden [N, D] -> logits [N, V] with packed weights; with `tie_to`, shares the embedding's blocks."""

    def __init__(self, vocab_size: int, hidden_size: int, qtype: str, tie_to: Optional[QuantizedEmbedding] = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.qtype = qtype
        self.amx_min_rows = 0  # > 0: calls of at least this many rows (decode batches) take the kernel's AMX path
        self.panels: Optional[torch.Tensor] = None  # its bf16 tiles made once (pack_amx)
        self.qpanels: Optional[QPanels] = None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, row_bytes(qtype, hidden_size), dtype=torch.uint8),
                                       requires_grad=False)
            self.weight.weight_loader = _packed_loader

    def pack_amx(self, int8: bool = False) -> None:
        """As QuantizedLinear.pack_amx (a tied head keeps its own tiles; the embedding reads the packed rows)."""
        self.panels, self.qpanels = (i8_pack if int8 else amx_pack)(self.weight.data, self.qtype, self.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return qlinear(hidden, self.weight, self.qtype, amx_min_rows=self.amx_min_rows,
                       qpanels=self.qpanels)  # [N, D] -> [N, V]


def _packed_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
    if shard_id is not None:
        raise ValueError(f"parameter is not packed, got shard {shard_id!r}")
    if loaded.dtype != torch.uint8 or tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"expected packed blocks uint8 {tuple(param.shape)}, checkpoint {loaded.dtype} "
                         f"{tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _checkpoint_names(model: nn.Module, name: str, module: nn.Module) -> dict[ShardId, str]:
    """Checkpoint weight names feeding `name` (one per shard for merged modules)."""
    if not isinstance(module, MergedLinear):
        return {None: f"{name}.weight"}
    prefix, _, ours = name.rpartition(".")
    packed: dict[str, tuple[str, ShardId]] = getattr(model, "packed_modules_mapping", {})
    out: dict[ShardId, str] = {}
    for ckpt, (our, shard) in packed.items():
        if our == ours and shard in module.shard_names:
            out[shard] = f"{prefix}.{ckpt}.weight"
    return out if len(out) == len(module.shard_names) else {}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _packable(qtype: Optional[str], in_features: int) -> bool:
    """Whether rows of in_features weights stored as qtype can stay packed (a known type, whole blocks)."""
    return qtype in QTYPES and in_features % block_size(qtype) == 0


def quantize_modules(model: nn.Module, types: dict[str, str],
                     dense_min_rows: Optional[int] = DEFAULT_DENSE_MIN_ROWS) -> set[str]:
    """Swap Linear / VocabEmbedding / LMHead modules whose checkpoint weights have a supported block type.

    types: checkpoint weight name -> GGUF type name in lower case (q4_1, q6_k, f32...).
    Returns the checkpoint names that must now be loaded as raw blocks.
    """
    raw: set[str] = set()
    emb: Optional[QuantizedEmbedding] = None
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear):
            if not module.packable:
                continue
            names = _checkpoint_names(model, name, module)
            shards = module.shard_names if isinstance(module, MergedLinear) else None
            kinds = [types.get(names.get(s, "")) for s in (shards or [None])]
            if not names or not all(_packable(k, module.in_features) for k in kinds) or len(kinds) > QPARTS_MAX:
                continue
            sizes = module.output_sizes if isinstance(module, MergedLinear) else [module.out_features]
            if len(set(kinds)) == 1:
                new: QuantizedLinear = QuantizedLinear(module.in_features, sizes, kinds[0],
                                                       bias=module.bias is not None, shard_names=shards,
                                                       dense_min_rows=dense_min_rows)
            else:
                new = MixedQuantizedLinear(module.in_features, sizes, kinds, bias=module.bias is not None,
                                           shard_names=shards, dense_min_rows=dense_min_rows)
            _set_module(model, name, new)
            raw.update(names.values())
        elif isinstance(module, VocabEmbedding):
            qtype = types.get(f"{name}.weight")
            if _packable(qtype, module.embedding_dim):
                emb = QuantizedEmbedding(module.num_embeddings, module.embedding_dim, qtype)
                _set_module(model, name, emb)
                raw.add(f"{name}.weight")
    tied = bool(getattr(model, "tie_word_embeddings", False))
    head = getattr(model, "lm_head", None)
    if isinstance(head, LMHead):
        vocab, hidden = head.weight.shape
        if tied and emb is not None:
            model.lm_head = QuantizedLMHead(vocab, hidden, emb.qtype, tie_to=emb)
        elif not tied and _packable(types.get("lm_head.weight"), hidden):
            model.lm_head = QuantizedLMHead(vocab, hidden, types["lm_head.weight"])
            raw.add("lm_head.weight")
    return raw


def _glu_sizes(model: nn.Module) -> dict[int, int]:
    """id(gate_up_proj) -> intermediate size of the gated MLPs whose packed gate|up can pair its tiles (I % 16)."""
    from tokenmill.model.layers.mlp import GatedMLP

    out: dict[int, int] = {}
    for m in model.modules():
        gu = getattr(m, "gate_up_proj", None) if isinstance(m, GatedMLP) else None
        if type(gu) is QuantizedLinear and gu.out_features % 32 == 0 and gu.output_sizes == [gu.out_features // 2] * 2:
            out[id(gu)] = gu.out_features // 2
    return out


def dense_switch_rows(modules) -> Optional[int]:
    """Fewest rows from which any of these modules (packed linears) runs its dense copy (None: none does)."""
    rows = [m.dense_min_rows for m in modules
            if isinstance(m, QuantizedLinear) and m.weight_dense is not None and m.dense_min_rows is not None]
    return min(rows) if rows else None


def dense_gemm_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype large calls of the packed linears compute in: bfloat16 on the AMX path, else their dense copies'
    dtype (None: neither, every call runs the float32 packed kernel)."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            if m.amx_min_rows:
                return torch.bfloat16
            if m.weight_dense is not None:
                return m.weight_dense.dtype
    return None


def panel_kinds(model: nn.Module) -> dict[str, int]:
    """How many packed linears and heads of `model` keep panels made at load, by kind: 'int8' (i8_pack) or 'bf16'
    (amx_pack: AMX tiles or AVX512-BF16 panels)."""
    out: dict[str, int] = {}
    for m in model.modules():
        st = getattr(m, "qpanels", None) if isinstance(m, (QuantizedLinear, QuantizedLMHead)) else None
        if st is not None:
            kind = "int8" if st.i8 else "bf16"
            out[kind] = out.get(kind, 0) + 1
    return out


def amx_switch_rows(modules) -> Optional[int]:
    """Fewest rows from which any of these modules (packed linears) runs the AMX path (None: none does)."""
    rows = [m.amx_min_rows for m in modules if isinstance(m, QuantizedLinear) and m.amx_min_rows]
    return min(rows) if rows else None


def amx_tile_plan(layer_bytes: int, head_bytes: int, moe: bool,
                  max_bytes: int = DENSE_COPY_MAX_BYTES) -> tuple[bool, bool]:
    """Which AMX bf16 tiles gemm auto makes once at load (2 bytes a weight, QuantizedLinear.pack_amx): (the layers'
    uniform packed linears, the LM head), given their tiles' bytes. Tiles pay where the tiled linears are most of
    a step's work, and they cost resident memory (#21: within 10% of the file plus KV):
    - a dense model tiles both while they total at most max_bytes (the dense copies' cap): SmolLM2's 0.25 GiB are
      worth 10-20% of a step at 16-64 decodes;
    - a MoE model (routed experts, never tiled, are most of its step) tiles its layers' linears only, within the
      cap: OLMoE-shaped Q4_K_M, 2 threads (bench/cpu_tiles_steps.py, bench/results/s20), the 49152 x 2048 head's
      tiles (192 MiB) were worth 0% of a 64-decode step and 2% at 16, the attention linears' (320 MiB) 2% at both.
    """
    if moe:
        return 0 < layer_bytes <= max_bytes, False
    fits = layer_bytes + head_bytes <= max_bytes
    return fits and layer_bytes > 0, fits and head_bytes > 0


def _dot_min_rows(qtype: str, float16_rows: int, int8_rows: int = 0) -> int:
    """Rows from which a linear's AVX512-BF16 panels take a call (no AMX): a 16-bit weight's from float16_rows, a
    block-quantized one's from BF16_DOT_QUANT_MIN_ROWS (fewer rows stay on the packed blocks), or int8_rows (> 0)
    where it has int8 panels."""
    if qtype in FLOAT16_QTYPES:
        return float16_rows
    return int8_rows or BF16_DOT_QUANT_MIN_ROWS


def takes_int8(qtype: str, int8: bool) -> bool:
    """Whether a packed linear of qtype gets int8 panels under gemm_int8's answer int8: block types only."""
    return int8 and qtype not in FLOAT16_QTYPES and qtype != "mixed"


def panel_bytes(qtype: str, k: int, n: int, int8: bool) -> int:
    """Bytes of the panels finalize_quantized makes for an [n, k] packed weight of qtype (int8 or bf16)."""
    return i8_panel_bytes(k, n) if takes_int8(qtype, int8) else amx_panel_bytes(k, n)


def finalize_quantized(model: nn.Module, max_copy_bytes: int = DENSE_COPY_MAX_BYTES,
                       dense_dtype: torch.dtype = torch.float32, int8: bool = False) -> None:
    """Call after the weights are loaded: builds the dense copies for large-M calls when they fit the cap, or the
    panels (bf16; int8 for block-quantized weights with int8, gemm_int8's answer)."""
    from tokenmill.model.layers.moe import PackedExperts

    from tokenmill.ops.moe.cpu import MoEWorkspace

    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    experts = [m for m in model.modules() if isinstance(m, PackedExperts)]
    workspace = MoEWorkspace()
    for module in experts:  # one scratch buffer for all MoE layers
        module.workspace = workspace
    heads = [m for m in model.modules() if isinstance(m, QuantizedLMHead)]
    uniform = [m for m in linears if m.qtype != "mixed"]  # mixed shards keep dequantizing per call (AMX)
    int8 = int8 and i8gemm_available()
    tile_layers, tile_heads = amx_tile_plan(
        sum(panel_bytes(m.qtype, m.in_features, m.out_features, int8) for m in uniform),
        sum(panel_bytes(h.qtype, h.hidden_size, h.weight.shape[0], int8) for h in heads), bool(experts),
        max_copy_bytes)
    amx = amx_available()
    if dense_dtype == torch.bfloat16 and not amx:  # experts' int8 / bf16-panel rows need no tile unit
        for module in experts:
            module.amx_min_rows, module.i8_max_rows, module.amx_i8_min_rows = moe_switch_rows()
    # no tile unit: the panels run on AVX512-BF16 (a 16-bit checkpoint's weights, or a GGUF's blocks dequantized
    # to bf16 once), made for every linear (no per-call dequantizing path there), in place of the dense copies
    dot = (not amx and linears and not experts and tile_layers and bf16_dot_available()
           and len(uniform) == len(linears))
    if dense_dtype == torch.bfloat16 and (linears or experts) and (amx or dot):
        for module in linears:
            i8 = takes_int8(module.qtype, int8) and module in uniform and tile_layers
            module.finalize(dense_dtype, amx=True, amx_min_rows=I8_MIN_ROWS if i8 else AMX_MIN_ROWS if amx
                            else _dot_min_rows(module.qtype, BF16_DOT_MIN_ROWS))
        for module in experts:  # an expert's few-row runs on the int8 tiles, many-row runs (prefill) on AMX
            module.amx_min_rows, module.i8_max_rows, module.amx_i8_min_rows = moe_switch_rows()
        for head in heads:
            head.amx_min_rows = (I8_HEAD_MIN_ROWS if takes_int8(head.qtype, int8) else HEAD_AMX_MIN_ROWS if amx
                                 else _dot_min_rows(head.qtype, BF16_DOT_HEAD_MIN_ROWS)) if tile_heads else 0
        # a small model's AMX tiles, made once (amx_tile_plan says which)
        glu = _glu_sizes(model)
        for module in (uniform if tile_layers else []) + (heads if tile_heads else []):
            module.pack_amx(int8=takes_int8(module.qtype, int8),
                            **({"glu": glu[id(module)]} if id(module) in glu else {}))
        return
    elem = torch.tensor([], dtype=dense_dtype).element_size()
    copy_bytes = sum(elem * m.in_features * m.out_features for m in linears if m.dense_min_rows is not None)
    for module in linears:
        if copy_bytes > max_copy_bytes:
            module.dense_min_rows = None
        module.finalize(dense_dtype)
