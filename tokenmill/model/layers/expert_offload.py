"""Expert offload mechanism: a device cache of MoE experts in front of a host tier holding all of them.

`ExpertOffload.install(model, capacity, device)` leaves every MoE block's experts on the host (`block.experts`,
pinned on CUDA) and creates one device pool of `capacity` expert slots (the same expert class, so dense and
packed experts both work). Each block's fused op (`block.op`) becomes an `OffloadedMoEOp` that, per forward:

1. counts the tokens routed to each expert (one host sync) and asks the policy
   (tokenmill/core/expert_cache.py, pure Python) for a LayerPlan;
2. copies the experts the plan fetches into their slots (on the compute stream, before the compute);
3. runs the pairs routed to device experts with the device's fused op over the pool (expert ids remapped to
   slots), and the pairs of host experts with the CPU op on the host tier (inputs copied over and back);
4. copies the admitted experts (host-run ones whose score earned a slot) and, with prefetch on, the experts the
   next layer's gate predicts from this layer's hidden state (Pre-gated MoE / Fate) on a side stream, so the
   copies overlap the compute; the compute stream waits for them before the next layer reads the pool.

On the CPU both tiers are CPU tensors: a small pool simulates the device (tests). The outputs equal the
un-offloaded model's up to float summation order (the same per-pair products, summed in another order).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from tokenmill.core.expert_cache import ExpertCachePolicy, ExpertCacheStats, ExpertCostModel, LayerPlan
from tokenmill.model.layers.moe import FusedExperts, MoEBlock, PackedExperts, moe_blocks
from tokenmill.ops.moe import select_moe_op
from tokenmill.ops.moe.cpu import fused_moe_cpu

logger = logging.getLogger(__name__)


def expert_nbytes(experts: nn.Module) -> int:
    """Bytes of one expert's gate, up and down weights."""
    p, d = experts.gate_up_proj, experts.down_proj
    return (p[0].numel() * p.element_size()) + (d[0].numel() * d.element_size())


def _new_pool(like: nn.Module, capacity: int, device: torch.device) -> nn.Module:
    with torch.device(device):
        if isinstance(like, PackedExperts):
            return PackedExperts(capacity, like.hidden_size, like.intermediate_size, like.qtype, like.down_qtype)
        if isinstance(like, FusedExperts):
            return FusedExperts(capacity, like.hidden_size, like.intermediate_size, like.gate_up_proj.dtype)
    raise TypeError(f"expert offload takes FusedExperts or PackedExperts, not {type(like).__name__}")


def move_model_keep_experts(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer to `device` except the experts of MoE blocks (they stay on the host)."""
    keep = {id(block.experts) for _, block in moe_blocks(model)}
    skip: set[int] = set()
    for module in model.modules():
        if id(module) in keep:
            skip.update(id(m) for m in module.modules())
        if id(module) in skip:
            continue
        for name, p in module._parameters.items():
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)


class OffloadedMoEOp:
    """The fused-op interface (x, experts, weights, ids) -> out for one MoE layer under offload."""

    def __init__(self, offload: "ExpertOffload", pos: int):
        self.offload, self.pos = offload, pos
        self.__name__ = "offloaded_moe"

    def __call__(self, x: torch.Tensor, experts: Any, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.offload.run(self.pos, x, experts, weights, ids)


class ExpertOffload:
    """The device pool, the host tier (the blocks' own experts) and the policy of one model."""

    def __init__(self, model: nn.Module, capacity: int, device: torch.device, cost: Optional[ExpertCostModel] = None,
                 prefetch: bool = False, decay: float = 0.9, host_device: torch.device = torch.device("cpu")):
        self.blocks: list[MoEBlock] = [block for _, block in moe_blocks(model)]
        if not self.blocks:
            raise ValueError("expert offload needs a mixture-of-experts model")
        ex0 = self.blocks[0].experts
        shapes = {(b.num_experts, b.experts.hidden_size, b.experts.intermediate_size, type(b.experts)) for b in self.blocks}
        if len(shapes) != 1:
            raise ValueError("expert offload needs every MoE layer's experts to have one shape")
        self.device, self.host_device = torch.device(device), torch.device(host_device)
        self.num_experts = ex0.num_experts
        self.prefetch = prefetch
        self.expert_bytes = expert_nbytes(ex0)
        if cost is None:
            cost = ExpertCostModel(self.expert_bytes, 6 * ex0.hidden_size * ex0.intermediate_size)
        total = len(self.blocks) * self.num_experts
        self.policy = ExpertCachePolicy(len(self.blocks), self.num_experts, min(capacity, total), cost, decay)
        self.pool = _new_pool(ex0, self.policy.capacity, self.device)
        self.device_op = select_moe_op(self.device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copies_pending = False
        for pos, block in enumerate(self.blocks):
            self._to_host(block.experts)
            block.op = OffloadedMoEOp(self, pos)
        # start with the first layers' experts resident (scores take over once requests run)
        for (pos, e), slot in self.policy.warm([(p, e) for p in range(len(self.blocks)) for e in range(self.num_experts)]):
            self._copy(pos, e, slot)

    @classmethod
    def install(cls, model: nn.Module, capacity: int, device: torch.device, **kw: Any) -> "ExpertOffload":
        """Offload the experts of `model` (replacing an offload installed before: its copies finish first)."""
        old = getattr(model, "expert_offload", None)
        if old is not None and old.copy_stream is not None:
            old.copy_stream.synchronize()  # its pool is freed next: no copy may still be writing into it
        off = cls(model, capacity, device, **kw)
        model.expert_offload = off  # the runner reads its stats through the model
        logger.info("expert offload: %d of %d experts on %s (%.2f GiB), the rest on the host; prefetch %s",
                    off.policy.capacity, len(off.blocks) * off.num_experts, off.device,
                    off.policy.capacity * off.expert_bytes / 2**30, "on" if off.prefetch else "off")
        return off

    @property
    def stats(self) -> ExpertCacheStats:
        return self.policy.stats

    def reset_stats(self) -> None:
        """Counters from zero (after start-up's profiling forward), the cache contents kept."""
        self.policy.stats = ExpertCacheStats(capacity=self.policy.capacity, resident=len(self.policy.slot_of))

    def _to_host(self, experts: nn.Module) -> None:
        pin = self.device.type == "cuda"
        for p in (experts.gate_up_proj, experts.down_proj):
            data = p.data.to(self.host_device)
            p.data = data.pin_memory() if pin and not data.is_pinned() else data

    def _copy(self, pos: int, e: int, slot: int) -> None:
        src = self.blocks[pos].experts
        self.pool.gate_up_proj.data[slot].copy_(src.gate_up_proj.data[e], non_blocking=True)
        self.pool.down_proj.data[slot].copy_(src.down_proj.data[e], non_blocking=True)

    def _copy_background(self, copies: list[tuple[int, int, int]]) -> None:
        """(layer pos, expert, slot) copies overlapped with the compute (a side stream on CUDA)."""
        if not copies:
            return
        if self.copy_stream is None:
            for c in copies:
                self._copy(*c)
            return
        # the slots may still be read by kernels queued on the compute stream: copy after them
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for c in copies:
                self._copy(*c)
        self._copies_pending = True

    def _wait_copies(self) -> None:
        if self._copies_pending:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._copies_pending = False

    # ---- one layer -------------------------------------------------------------------------------------
    def run(self, pos: int, x: torch.Tensor, host_experts: Any, weights: torch.Tensor,
            ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights / ids [T, K] -> [T, H] (x's dtype).

        Order matters on CUDA: every host sync (routing, host inputs, the prediction) comes before the device
        experts are queued, so the background copies (side stream), the device experts (compute stream) and the
        host experts (this thread) then run at the same time."""
        t, k = ids.shape
        flat_h = ids.reshape(-1).to("cpu", torch.int64)  # [T*K]: the one copy of the routing to the host
        plan = self.policy.plan_layer(pos, torch.bincount(flat_h, minlength=self.num_experts).tolist())
        self._wait_copies()
        for e, slot in plan.fetch:
            self._copy(pos, e, slot)
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
        w = weights.reshape(-1)  # [T*K]
        host = self._host_inputs(plan, x, w, flat_h, k) if plan.host and t else None
        background = [(pos, e, slot) for e, slot in plan.admit]
        if self.prefetch and pos + 1 < len(self.blocks) and t:
            background += [(pos + 1, e, slot) for e, slot in
                           self.policy.plan_prefetch(pos + 1, self._predict(pos + 1, x), protect_layer=pos)]
        self._copy_background(background)
        if plan.device and t:
            self._run_device(plan, x, w, flat_h, k, out)
        if host is not None:
            tok, xs, ws, es = host
            y = fused_moe_cpu(xs, host_experts, ws, es)  # [P, H] on the host
            out.index_add_(0, tok, y.to(out.device).float())
        return out.to(x.dtype)

    def _pairs(self, experts: list[int], flat_h: torch.Tensor) -> torch.Tensor:
        """Flat pair indices [P] (host) routed to any of `experts`."""
        member = torch.zeros(self.num_experts, dtype=torch.bool)
        member[experts] = True
        return member[flat_h].nonzero().squeeze(1)

    def _run_device(self, plan: LayerPlan, x: torch.Tensor, w: torch.Tensor, flat_h: torch.Tensor, k: int,
                    out: torch.Tensor) -> None:
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.int64)
        slot_of[list(plan.device)] = torch.tensor(list(plan.device.values()), dtype=torch.int64)
        pairs = self._pairs(list(plan.device), flat_h)
        slots = slot_of[flat_h[pairs]].to(x.device, non_blocking=True)[:, None]  # [P, 1]
        pairs = pairs.to(x.device, non_blocking=True)
        tok = pairs // k
        y = self.device_op(x.index_select(0, tok), self.pool, w[pairs][:, None], slots)  # [P, H], weighted
        out.index_add_(0, tok, y.float())

    def _host_inputs(self, plan: LayerPlan, x: torch.Tensor, w: torch.Tensor, flat_h: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token rows on x's device, their inputs, weights and expert ids on the host) of the host pairs."""
        pairs = self._pairs(plan.host, flat_h)
        pairs_d = pairs.to(x.device, non_blocking=True)
        tok = pairs_d // k
        h = self.host_device
        xs = x.index_select(0, tok).to(h)  # [P, H]
        return tok, xs, w[pairs_d][:, None].to(h), flat_h[pairs][:, None].to(h)

    def _predict(self, pos: int, x: torch.Tensor) -> list[tuple[int, int]]:
        """(expert, tokens) the next layer will route, most likely first: its gate on this layer's MoE input
        (Pre-gated MoE / Fate), experts ranked by the routing weight they would get, summed over the tokens."""
        block = self.blocks[pos]
        weights, ids = block.route(x)  # [T, K] each
        flat = ids.reshape(-1)
        mass = torch.zeros(self.num_experts, dtype=torch.float32, device=x.device).index_add_(
            0, flat, weights.reshape(-1).float())  # [E]
        tokens = torch.bincount(flat, minlength=self.num_experts)  # [E]
        order = torch.argsort(mass, descending=True)
        ranked = torch.stack([order, tokens[order]], dim=1).tolist()  # one copy to the host
        return [(e, n) for e, n in ranked if n]
