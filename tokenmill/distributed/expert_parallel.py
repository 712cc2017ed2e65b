"""Mixture-of-experts layers under tensor parallelism, applied from outside like the dense shards.

Two ways to split the experts over N ranks, each ending in ONE all-reduce per MoE layer:

  default                 every rank holds a 1/N slice of every expert's intermediate dimension (gate|up rows,
                          down columns): silu(gate) * up is elementwise, so each rank's routed sum is a partial
                          sum of the true output (Megatron's column / row split, per expert)
  enable_expert_parallel  rank r holds experts [r * E/N, (r + 1) * E/N) whole and runs only the (token, expert)
                          pairs routed to them, compacted to one row per pair (expert parallelism)

The router is replicated (every rank routes every token the same way); a shared expert is split like a dense
MLP, its down projection left unreduced so that the routed and shared partial sums share the one all-reduce.
The block stays a MoEBlock (its checkpoint names, expert_counts and swappable fused op `op` are unchanged).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.distributed.group import TPGroup, shard_range, split_size
from tokenmill.model.layers.linear import ShardId
from tokenmill.model.layers.moe import FusedExperts, MoEBlock
from tokenmill.model.layers.parallel import ColumnParallelLinear, RowParallelLinear
from tokenmill.ops.moe import select_experts

Tensor = torch.Tensor


class _CheckedExperts(FusedExperts):
    """FusedExperts whose loaders see checkpoint tensors of the FULL expert set (E experts, intermediate I) and
    keep this rank's part; subclasses say which part in `_gate_up_part` / `_down_part`."""

    def __init__(self, num_local: int, hidden: int, inter_local: int, full_experts: int, full_inter: int,
                 dtype: torch.dtype):
        super().__init__(num_local, hidden, inter_local, dtype)
        self.full_experts, self.full_inter = full_experts, full_inter

    def _expect(self, loaded: Tensor, shape: tuple[int, ...]) -> Tensor:
        if tuple(loaded.shape) != shape:
            raise ValueError(f"shape mismatch: expected {shape}, checkpoint {tuple(loaded.shape)}")
        return loaded

    def _load_gate_up(self, param: nn.Parameter, loaded: Tensor, shard_id: ShardId = None) -> list:
        e_all, i_all, h = self.full_experts, self.full_inter, self.hidden_size
        if shard_id is None:  # fused [E, 2I, H]
            full = self._expect(loaded, (e_all, 2 * i_all, h))
            return self._put_gate_up(param, 0, full[:, :i_all]) + self._put_gate_up(param, 1, full[:, i_all:])
        if shard_id in ("gate", "up"):  # [E, I, H] (llama.cpp's 3-D ffn_*_exps)
            return self._put_gate_up(param, 0 if shard_id == "gate" else 1, self._expect(loaded, (e_all, i_all, h)))
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and 0 <= shard_id[0] < e_all
                and shard_id[1] in (0, 1)):
            raise ValueError(f"unknown expert shard {shard_id!r} ({e_all} experts)")
        e, j = shard_id  # one expert's gate or up [I, H]
        local = self._local(e)
        if local is None:
            return []
        part = self._rows(self._expect(loaded, (i_all, h)), 0)
        il = self.intermediate_size
        param.data[local, j * il:(j + 1) * il].copy_(part)
        return [shard_id]

    def _put_gate_up(self, param: nn.Parameter, j: int, full: Tensor) -> list:
        """full [E, I, H] gate (j=0) or up (j=1) of every expert -> this rank's part."""
        il = self.intermediate_size
        part = self._experts(self._rows(full, 1))
        param.data[:, j * il:(j + 1) * il].copy_(part)
        return [s for s in param.shard_ids if s[1] == j]

    def _load_down(self, param: nn.Parameter, loaded: Tensor, shard_id: ShardId = None) -> list:
        e_all, i_all, h = self.full_experts, self.full_inter, self.hidden_size
        if shard_id is None:  # [E, H, I]
            param.data.copy_(self._experts(self._rows(self._expect(loaded, (e_all, h, i_all)), 2)))
            return list(param.shard_ids)
        if not (isinstance(shard_id, int) and 0 <= shard_id < e_all):
            raise ValueError(f"unknown expert shard {shard_id!r} ({e_all} experts)")
        local = self._local(shard_id)
        if local is None:
            return []
        param.data[local].copy_(self._rows(self._expect(loaded, (h, i_all)), 1))
        return [shard_id]

    # what this rank keeps ------------------------------------------------------------------------------------
    def _local(self, e: int):
        """Local slot of global expert e, or None when another rank holds it."""
        return e

    def _experts(self, full: Tensor) -> Tensor:
        """[E, ...] -> this rank's experts."""
        return full

    def _rows(self, t: Tensor, dim: int) -> Tensor:
        """The intermediate dimension `dim` of t -> this rank's slice."""
        return t


class IntermediateShardedExperts(_CheckedExperts):
    """Every expert, intermediate rows [start, start + inter_local) of gate and up, the same columns of down."""

    def __init__(self, num_experts: int, hidden: int, inter: int, tp: TPGroup, dtype: torch.dtype):
        start, local = shard_range(inter, tp.rank, tp.world_size, "moe_intermediate_size")
        super().__init__(num_experts, hidden, local, num_experts, inter, dtype)
        self.inter_start = start
        self.gate_up_proj.shard_ids = [(e, j) for e in range(num_experts) for j in (0, 1)]
        self.down_proj.shard_ids = list(range(num_experts))

    def _rows(self, t: Tensor, dim: int) -> Tensor:
        return t.narrow(dim, self.inter_start, self.intermediate_size)


class LocalExperts(_CheckedExperts):
    """Experts [first, first + num_local) whole (expert parallelism); global shard ids in `shard_ids`."""

    def __init__(self, num_experts: int, hidden: int, inter: int, tp: TPGroup, dtype: torch.dtype):
        local = split_size(num_experts, tp.world_size, "num_experts (expert parallelism)")
        super().__init__(local, hidden, inter, num_experts, inter, dtype)
        self.first = tp.rank * local
        self.gate_up_proj.shard_ids = [(e, j) for e in range(self.first, self.first + local) for j in (0, 1)]
        self.down_proj.shard_ids = list(range(self.first, self.first + local))

    def _local(self, e: int):
        return e - self.first if self.first <= e < self.first + self.num_experts else None

    def _experts(self, full: Tensor) -> Tensor:
        return full[self.first:self.first + self.num_experts]


class ParallelMoEBlock(MoEBlock):
    """A MoEBlock whose experts (and shared expert) are split over the ranks; forward ends in one all-reduce."""

    tp: TPGroup
    expert_parallel: bool

    def forward(self, h: Tensor) -> Tensor:
        logits = self.gate(h)  # [T, E]: the router is replicated
        weights, ids = select_experts(logits, self.top_k, self.renormalize)  # [T, K], global expert ids
        self.expert_counts.index_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
        if self.expert_parallel:
            out = self._local_pairs(h, weights, ids)
        else:
            out = self.op(h, self.experts, weights, ids)  # [T, H], partial over the intermediate slices
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)  # partial too
        return self.tp.all_reduce(out)

    def _local_pairs(self, h: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """The routed sum over this rank's experts: each (token, expert) pair routed here becomes one row with
        top-1 routing, so any fused op runs it and no expert sees tokens routed elsewhere."""
        ex = self.experts
        local = (ids >= ex.first) & (ids < ex.first + ex.num_experts)  # [T, K]
        tok, slot = local.nonzero(as_tuple=True)  # [P] each
        out = torch.zeros_like(h)
        if tok.numel() == 0:
            return out
        part = self.op(h[tok], ex, weights[tok, slot][:, None], (ids[tok, slot] - ex.first)[:, None])  # [P, H]
        return out.index_add_(0, tok, part.to(h.dtype))


def shard_moe_block(block: MoEBlock, tp: TPGroup, expert_parallel: bool, dtype: torch.dtype,
                    device: torch.device) -> ParallelMoEBlock:
    """This rank's ParallelMoEBlock for `block` (built, weights not loaded yet)."""
    ex = block.experts
    if not isinstance(ex, FusedExperts):
        raise ValueError(f"cannot shard {type(ex).__name__} experts")
    with torch.device(device):
        cls = LocalExperts if expert_parallel else IntermediateShardedExperts
        block.experts = cls(ex.num_experts, ex.hidden_size, ex.intermediate_size, tp, dtype)
    if block.shared_expert is not None:
        se = block.shared_expert
        gu = se.gate_up_proj
        ranges = [shard_range(n, tp.rank, tp.world_size, "shared_expert_intermediate_size")
                  for n in gu.output_sizes]
        se.gate_up_proj = ColumnParallelLinear(gu.in_features, gu.output_sizes, [s for s, _ in ranges],
                                               [n for _, n in ranges], gu.shard_names, gu.bias is not None, dtype,
                                               device)
        down = se.down_proj
        se.down_proj = RowParallelLinear(down.in_features, down.out_features, down.bias is not None, tp, dtype,
                                         device, reduce=False)
    block.__class__ = ParallelMoEBlock  # same module, same parameters: only forward changes
    block.tp, block.expert_parallel = tp, expert_parallel
    return block  # type: ignore[return-value]


def is_moe(mlp: Any) -> bool:
    return isinstance(mlp, MoEBlock)
