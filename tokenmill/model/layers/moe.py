"""Sparse mixture-of-experts block: a router, E gated experts in fused tensors, an optional shared expert.

Experts are stored fused: gate|up [E, 2I, H] and down [E, H, I] (transformers 5's in-memory layout). Their
loaders take every checkpoint form: one expert's matrix (shard (e, 0) gate, (e, 1) up, e down), all experts'
gate or up at once (shard "gate" / "up", [E, I, H], llama.cpp's 3-D ffn_*_exps) and whole fused tensors.
The fused MoE op (tokenmill/ops/moe) is a plain attribute `op`, swapped from outside like the attention
backend; the block counts how many tokens each expert got in `expert_counts` (on the device, no host sync).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.layers.linear import Linear, ShardId
from tokenmill.model.layers.mlp import GatedMLP, check_activation
from tokenmill.ops.moe import MoEOp, select_experts, select_experts_grouped
from tokenmill.ops.moe.reference import fused_moe_reference

# checkpoint rules shared by the MoE families (see decoder.CausalLM.checkpoint_rules)
EXPERT_RULES = (
    (r"(.*)\.experts\.(\d+)\.gate_proj\.weight", r"\1.experts.gate_up_proj", lambda m: (int(m[2]), 0)),
    (r"(.*)\.experts\.(\d+)\.up_proj\.weight", r"\1.experts.gate_up_proj", lambda m: (int(m[2]), 1)),
    (r"(.*)\.experts\.(\d+)\.down_proj\.weight", r"\1.experts.down_proj", lambda m: int(m[2])),
    (r"(.*)\.experts\.gate_proj\.weight", r"\1.experts.gate_up_proj", lambda m: "gate"),  # 3-D, from GGUF
    (r"(.*)\.experts\.up_proj\.weight", r"\1.experts.gate_up_proj", lambda m: "up"),
    (r"(.*)\.experts\.down_proj\.weight", r"\1.experts.down_proj", None),
)
# llama.cpp MoE block tensors -> checkpoint modules
GGUF_MOE_BLOCK = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}


def _host_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty; on the CPU backed by huge pages where Linux grants them (the experts are streamed once a decode
    step, and 4 KiB pages cost ~20% of that bandwidth: ops/cpu/host.advise_huge_pages)."""
    t = torch.empty(*shape, dtype=dtype)
    if t.device.type == "cpu":
        from tokenmill.ops.cpu.host import advise_huge_pages

        advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
    return t


class _ExpertStore(nn.Module):
    """gate_up_proj [E, 2I, ...] and down_proj [E, H, ...] parameters with the shard-aware loaders."""

    def _make(self, num_experts: int, hidden: int, inter: int, row_len_h: int, row_len_i: int,
              dtype: torch.dtype) -> None:
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(_host_tensor(num_experts, 2 * inter, row_len_h, dtype=dtype),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(_host_tensor(num_experts, hidden, row_len_i, dtype=dtype), requires_grad=False)
        self.gate_up_proj.shard_ids = [(e, j) for e in range(num_experts) for j in (0, 1)]
        self.down_proj.shard_ids = list(range(num_experts))
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.down_proj.weight_loader = self._load_down

    def _fit(self, target: torch.Tensor, loaded: torch.Tensor) -> torch.Tensor:
        if loaded.numel() == target.numel() and loaded.dim() != target.dim():  # packed GGUF rows [E*N, bytes]
            loaded = loaded.reshape(target.shape)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, checkpoint {tuple(loaded.shape)}")
        if (target.dtype == torch.uint8) != (loaded.dtype == torch.uint8):
            raise ValueError(f"expected {target.dtype} expert weights, checkpoint {loaded.dtype}")
        return loaded

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> list:
        e_all, inter = self.num_experts, self.intermediate_size
        if shard_id is None:
            param.data.copy_(self._fit(param.data, loaded))
            return list(param.shard_ids)
        if shard_id in ("gate", "up"):
            j = 0 if shard_id == "gate" else 1
            param.data[:, j * inter:(j + 1) * inter].copy_(self._fit(param.data[:, j * inter:(j + 1) * inter], loaded))
            return [(e, j) for e in range(e_all)]
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and 0 <= shard_id[0] < e_all
                and shard_id[1] in (0, 1)):
            raise ValueError(f"unknown expert shard {shard_id!r} ({e_all} experts)")
        e, j = shard_id
        target = param.data[e, j * inter:(j + 1) * inter]
        target.copy_(self._fit(target, loaded))
        return [shard_id]

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> list:
        if shard_id is None:
            param.data.copy_(self._fit(param.data, loaded))
            return list(param.shard_ids)
        if not (isinstance(shard_id, int) and 0 <= shard_id < self.num_experts):
            raise ValueError(f"unknown expert shard {shard_id!r} ({self.num_experts} experts)")
        param.data[shard_id].copy_(self._fit(param.data[shard_id], loaded))
        return [shard_id]


class FusedExperts(_ExpertStore):
    """Dense experts: gate_up_proj [E, 2I, H], down_proj [E, H, I] in the model dtype."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self._make(num_experts, hidden, inter, hidden, inter, dtype)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj, self.down_proj

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gate_up_proj[e])  # [n, H] -> [n, 2I]

    def down(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.down_proj[e])  # [n, I] -> [n, H]


class PackedExperts(_ExpertStore):
    """Experts kept as GGUF blocks (uint8 rows) run by the CPU qlinear kernel: gate_up_proj [E, 2I, row_bytes(H)]
    in block type `qtype`, down_proj [E, H, row_bytes(I)] in `down_qtype` (the same unless given: llama.cpp's
    Q4_K_M stores some layers' ffn_down_exps as Q6_K). Any block type `tokenmill.ops.cpu.qlinear` supports plugs
    in here."""

    def __init__(self, num_experts: int, hidden: int, inter: int, qtype: str, down_qtype: Optional[str] = None):
        from tokenmill.ops.cpu.qlinear import DIRECT_MAX_ROWS, row_bytes

        super().__init__()
        self.qtype = qtype
        self.down_qtype = down_qtype or qtype
        self.amx_min_rows = 0  # > 0: an expert's calls of at least this many rows take the kernel's AMX bf16 path
        self.i8_max_rows = DIRECT_MAX_ROWS  # with amx_min_rows: the fused op runs an expert's 1..i8_max_rows rows on
        # int8 activations: the AMX int8 tiles from amx_i8_min_rows rows (0: never), else the VNNI tiles
        self.amx_i8_min_rows = 0  # (finalize_quantized sets all three)
        self.workspace = None  # the fused op's scratch (ops/moe/cpu.py MoEWorkspace), shared by a model's layers
        self._make(num_experts, hidden, inter, row_bytes(qtype, hidden), row_bytes(self.down_qtype, inter), torch.uint8)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized float32 copies (for the reference op only)."""
        from tokenmill.ops.cpu.qlinear import dequantize

        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        w13 = dequantize(self.gate_up_proj.reshape(e * 2 * i, -1), self.qtype, h).reshape(e, 2 * i, h)
        w2 = dequantize(self.down_proj.reshape(e * h, -1), self.down_qtype, i).reshape(e, h, i)
        return w13, w2

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        from tokenmill.ops.cpu.qlinear import qlinear

        return qlinear(x, self.gate_up_proj[e], self.qtype, amx_min_rows=self.amx_min_rows)  # [n, H] -> [n, 2I]

    def down(self, e: int, x: torch.Tensor) -> torch.Tensor:
        from tokenmill.ops.cpu.qlinear import qlinear

        return qlinear(x, self.down_proj[e], self.down_qtype, amx_min_rows=self.amx_min_rows)  # [n, I] -> [n, H]

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, inter={self.intermediate_size}, "
                f"qtype={self.qtype}" + (f", down_qtype={self.down_qtype}" if self.down_qtype != self.qtype else ""))


class SharedExpertGate(Linear):
    """The [1, H] sigmoid gate of the shared expert; also takes llama.cpp's 1-D [H] ffn_gate_inp_shexp."""

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.weight and loaded.dim() == 1:
            loaded = loaded[None, :]
        super().weight_loader(param, loaded, shard_id)


class MoEBlock(nn.Module):
    """x [T, H] -> sum over the top_k routed experts of weight * expert(x) (+ sigmoid(gate) * shared expert, or the
    shared expert alone without shared_expert_gate)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 dtype: torch.dtype, shared_intermediate_size: int = 0, hidden_act: Optional[str] = "silu",
                 shared_expert_gate: bool = True):
        super().__init__()
        check_activation(hidden_act)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in [1, num_experts {num_experts}]")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = Linear(hidden, num_experts, dtype=dtype)  # the router
        self.experts: nn.Module = FusedExperts(num_experts, hidden, intermediate_size, dtype)
        self.shared_expert: Optional[GatedMLP] = None
        self.shared_expert_gate: Optional[SharedExpertGate] = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden, shared_intermediate_size, dtype)
            if shared_expert_gate:  # Qwen2-MoE: sigmoid-gated; DeepSeek: added as is
                self.shared_expert_gate = SharedExpertGate(hidden, 1, dtype=dtype)
        self.op: MoEOp = fused_moe_reference  # swapped from outside (tokenmill.ops.moe.select_moe_op)
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, H] -> (weights [T, K] float32, expert ids [T, K]): softmax top-k of the router's logits."""
        return select_experts(self.gate(h), self.top_k, self.renormalize)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(h)  # [T, K] each
        self.expert_counts.index_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
        out = self.op(h, self.experts, weights, ids)  # [T, H]
        if self.shared_expert is not None:
            shared = self.shared_expert(h)  # [T, H]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
        return out


class GroupedTopkRouter(Linear):
    """DeepSeek's router: a float32 [E, H] linear (float32 whatever the model dtype, like transformers) and, for
    sigmoid scoring, the float32 e_score_correction_bias [E] that steers the choice but not the weights."""

    packable = False  # forward reads the float32 weight

    def __init__(self, hidden: int, num_experts: int, correction_bias: bool):
        super().__init__(hidden, num_experts, dtype=torch.float32)
        self.e_score_correction_bias: Optional[nn.Parameter] = None
        if correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
            self.e_score_correction_bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)  # [T, E] float32


class GroupedTopkMoEBlock(MoEBlock):
    """DeepSeek-V2/V3 MoE: routing by tokenmill.ops.moe.select_experts_grouped (softmax or sigmoid + bias scores,
    group-limited top-k, routed scaling factor) and shared experts added without a gate."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate_size: int, dtype: torch.dtype, *,
                 scoring: str, num_groups: int, topk_groups: int, group_score: str, renormalize: bool,
                 scaling_factor: float, shared_intermediate_size: int, hidden_act: Optional[str] = "silu"):
        super().__init__(hidden, num_experts, top_k, intermediate_size, renormalize, dtype,
                         shared_intermediate_size=shared_intermediate_size, hidden_act=hidden_act,
                         shared_expert_gate=False)
        self.gate = GroupedTopkRouter(hidden, num_experts, correction_bias=scoring == "sigmoid")
        self.routing = dict(scoring=scoring, num_groups=num_groups, topk_groups=topk_groups,
                            group_score=group_score, renormalize=renormalize, scaling_factor=scaling_factor)
        select_experts_grouped(torch.zeros(1, num_experts), top_k, **self.routing)  # bad settings fail here

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts_grouped(self.gate(h), self.top_k, bias=self.gate.e_score_correction_bias,
                                      **self.routing)


def moe_blocks(model: nn.Module) -> list[tuple[int, MoEBlock]]:
    """(layer index, block) of every MoE layer of a decoder model."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    return [(i, layer.mlp) for i, layer in enumerate(layers) if isinstance(getattr(layer, "mlp", None), MoEBlock)]


def quantize_experts(model: nn.Module, types: dict[str, str]) -> set[str]:
    """Swap FusedExperts for PackedExperts where the GGUF expert tensors are in block types the CPU kernel runs
    (like layers.quantized.quantize_modules for linears): gate and up in one type, down in that type or another
    (Q4_K_M's Q6_K down). types: checkpoint name -> GGUF type (lower case). Returns the checkpoint names to load as
    raw blocks."""
    from tokenmill.ops.cpu.qlinear import FLOAT16_QTYPES, QTYPES, block_size

    raw: set[str] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, MoEBlock) or not isinstance(module.experts, FusedExperts):
            continue
        ex = module.experts
        names = {p: [f"{name}.experts.{p}_proj.weight"] for p in ("gate", "up", "down")}  # 3-D ffn_*_exps
        if not any(n in types for ns in names.values() for n in ns):  # the older layout: one tensor per expert
            names = {p: [f"{name}.experts.{e}.{p}_proj.weight" for e in range(ex.num_experts)]
                     for p in ("gate", "up", "down")}
        gate_up = {types.get(n) for n in names["gate"] + names["up"]}
        down = {types.get(n) for n in names["down"]}
        if len(gate_up) != 1 or len(down) != 1:
            continue
        qtype, down_qtype = next(iter(gate_up)), next(iter(down))
        if {qtype, down_qtype} & set(FLOAT16_QTYPES):  # experts in 16-bit floats: dense (the MoE op takes blocks)
            continue
        if qtype not in QTYPES or down_qtype not in QTYPES or ex.hidden_size % block_size(qtype) \
                or ex.intermediate_size % block_size(down_qtype):
            continue
        module.experts = PackedExperts(ex.num_experts, ex.hidden_size, ex.intermediate_size, qtype, down_qtype)
        raw.update(n for ns in names.values() for n in ns)
    return raw


def gguf_moe_kwargs(meta: Any, experts_field: str = "num_experts", norm_default: bool = False) -> dict[str, Any]:
    """The routing fields of a MoE config from GGUF metadata: expert counts and norm_topk_prob (from
    expert_weights_norm, else the family's llama.cpp default). Only softmax gating is supported."""
    from tokenmill.errors import ModelLoadError

    gating = meta("expert_gating_func")
    if gating is not None and int(gating) != 1:  # llama.cpp: 1 softmax, 2 sigmoid
        raise ModelLoadError(f"unsupported expert gating function {int(gating)} (only softmax, 1)")
    norm = meta("expert_weights_norm")
    return {experts_field: int(meta("expert_count")), "num_experts_per_tok": int(meta("expert_used_count")),
            "norm_topk_prob": norm_default if norm is None else bool(norm)}
