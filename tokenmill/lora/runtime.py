"""The runner's side of multi-LoRA: adapter slots in stacked buffers, the step's row -> slot layout, and the
forward hooks that add each packed projection's LoRA term (qkv, o, gate_up, down) to its output.

On the CPU the fused C decoder layer (ops/cpu/layer.py) adds the same term inside its one call (csrc/lora.c),
given the step's adapter row spans; a step it cannot take that way runs the per-op path with the hooks
(counted in unfused_steps).

Buffers per (layer, packed projection): a [S, in, K], b [S, K, out] with S = slots (max_cpu_loras),
K = slices * max_rank (q|k|v: 3 slices, gate|up: 2); an adapter's A^T / B^T go into its slot, rank padded with
zeros, B block-diagonal over the slices, so one op serves the whole packed projection. A target the adapter
lacks stays zero. Hooks do nothing in a step without LoRA rows (the layout is None). Where the fused layer's
LoRA term runs in bfloat16 (c_bf16: the packed linears compute their large calls in bfloat16), each projection
also keeps a16 / b16, every slot's A and B in bfloat16 in csrc/lora.c's packed layouts, repacked at each load.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any, Callable, Optional

import torch

from tokenmill.lora.adapter import LoRAWeights, target_shapes_of
from tokenmill.ops.lora.reference import LoRALayout, lora_reference

logger = logging.getLogger(__name__)

# packed projection -> (the layer attribute holding it, the checkpoint targets it packs, in order)
PACKED = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
          "gate_up_proj": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}


class _Projection:
    """The LoRA buffers of one packed projection of one layer."""

    def __init__(self, fan_in: int, outs: list[int], slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.outs = outs
        self.offsets = [sum(outs[:i]) for i in range(len(outs))]
        self.rank = rank
        k = len(outs) * rank
        self.a = torch.zeros(slots, fan_in, k, dtype=dtype, device=device)  # [S, in, K]
        self.b = torch.zeros(slots, k, sum(outs), dtype=dtype, device=device)  # [S, K, out]
        # slice s's columns [cols[s], cols[s+1]) of B are non-zero only in its rank rows (the C kernel skips the rest)
        self.cols = torch.tensor([sum(outs[:i]) for i in range(len(outs) + 1)], dtype=torch.int64)
        self.a16: Optional[torch.Tensor] = None  # bfloat16 copies packed for csrc/lora.c (enable_bf16)
        self.b16: Optional[torch.Tensor] = None

    def enable_bf16(self) -> None:
        """Keep bfloat16 copies of every slot's A and B in csrc/lora.c's packed layouts (see pack_bf16)."""
        slots, fan_in, k = self.a.shape
        kp, in2, r2 = -(-k // 16) * 16, -(-fan_in // 32) * 32, self.rank + self.rank % 2
        self.a16 = torch.zeros(slots, in2 * kp, dtype=torch.bfloat16)
        self.b16 = torch.zeros(slots, r2 * sum(-(-n // 16) * 16 for n in self.outs), dtype=torch.bfloat16)
        for slot in range(slots):
            self.pack_bf16(slot)

    def pack_bf16(self, slot: int) -> None:
        """a16[slot] = A as [in2 / 2][Kp][2] (input pairs interleaved: the vdpbf16ps and AMX tile operand; in2 = in
        rounded up to 32), b16[slot] = each slice's rank rows of B as [n16 / 16][r2 / 2][16][2] (its columns in
        groups of 16, rounded up), slices back to back; zero padded (csrc/lora.c)."""
        if self.a16 is None:
            return
        a = self.a[slot].float()
        fan_in, k = a.shape
        in2, r = -(-fan_in // 32) * 32, self.rank
        kp, r2 = self.a16.shape[1] // in2, r + r % 2
        ap = torch.zeros(in2, kp)
        ap[:fan_in, :k] = a
        self.a16[slot].copy_(ap.view(in2 // 2, 2, kp).transpose(1, 2).reshape(-1))
        parts = []
        for s, (o0, n) in enumerate(zip(self.offsets, self.outs)):
            n16 = -(-n // 16) * 16
            bs = torch.zeros(r2, n16)
            bs[:r, :n] = self.b[slot, s * r:(s + 1) * r, o0:o0 + n].float()
            # [r2, n16] -> [n16 / 16][r2 / 2][16][2]
            parts.append(bs.view(r2 // 2, 2, n16 // 16, 16).permute(2, 0, 3, 1).reshape(-1))
        self.b16[slot].copy_(torch.cat(parts))


class LoRARuntime:
    """Installed on a model by the runner (enable_lora). `op(y, x, a, b, layout)` is the batched LoRA op."""

    def __init__(self, model: Any, num_slots: int, max_rank: int, device: torch.device, dtype: torch.dtype,
                 op: Optional[Callable[..., None]] = None):
        shapes = target_shapes_of(model)
        if shapes is None:
            from tokenmill.errors import ConfigError

            raise ConfigError("enable_lora: this model's layers have no plain attention projections to attach "
                              "LoRA to", param="enable_lora")
        self.shapes = shapes
        self.device = device
        self.op = op or select_lora_op(device)
        self.layout: Optional[LoRALayout] = None
        self.slot_of: dict[int, int] = {}
        self.free_slots = list(range(num_slots))
        self.projections: list[dict[str, _Projection]] = []
        self.unfused_steps = 0  # steps that left the fused C layer for LoRA rows
        self._paused_fast_paths: list[tuple[Any, Any]] = []
        self._fused_lora_layers: list[Any] = []
        self._hooks = []
        targets = shapes["targets"]
        for layer in model.model.layers:
            per: dict[str, _Projection] = {}
            for packed, (parent, subs) in PACKED.items():
                if not all(t in targets for t in subs):
                    continue
                proj = _Projection(targets[subs[0]][0], [targets[t][1] for t in subs], num_slots, max_rank, dtype,
                                   device)
                per[packed] = proj
                module = getattr(getattr(layer, parent), packed)
                self._hooks.append(module.register_forward_hook(self._hook(proj)))
            self.projections.append(per)
        self.layers = list(model.model.layers)
        # the fused C layer's LoRA term in bfloat16 when the packed linears' large calls run in bfloat16 (AMX): the
        # LoRA term then keeps the base GEMM's precision at half the weight traffic and twice the dot-product rate
        self.c_bf16 = device.type == "cpu" and dtype == torch.float32 and _c_bf16_fits(model)
        if self.c_bf16:
            for per in self.projections:
                for proj in per.values():
                    proj.enable_bf16()
        # (fast path, its TmLoRA, a pointer to it)
        self._c_lora: list[tuple[Any, Optional[Any], Optional[Any]]] = [(None, None, None)] * len(self.layers)
        self._c_spans = None  # the step's span tensors (kept alive while the C layers read them)

    def _c_struct(self, layer: Any, per: dict) -> Optional[Any]:
        """The fused C layer's view of this layer's buffers (tokenmill/ops/cpu/layer.py TmLoRA), or None."""
        fast = getattr(layer, "fast_path", None)
        if fast is None or not hasattr(fast, "lora") or len(per) != len(PACKED):
            return None
        from tokenmill.ops.cpu.layer import TmLoRA

        st = TmLoRA()
        for i, name in enumerate(PACKED):
            proj = per[name]
            if proj.a.dtype != torch.float32 or not proj.a.is_contiguous() or not proj.b.is_contiguous():
                return None
            st.proj[i].a, st.proj[i].b, st.proj[i].k = proj.a.data_ptr(), proj.b.data_ptr(), proj.a.shape[2]
            st.proj[i].nslices, st.proj[i].cols = len(proj.outs), proj.cols.data_ptr()
            if self.c_bf16 and proj.a16 is not None:
                st.proj[i].a16, st.proj[i].b16 = proj.a16.data_ptr(), proj.b16.data_ptr()
        return st

    def set_c_bf16(self, on: bool) -> None:
        """Run the fused layer's LoRA term with the bfloat16 kernel (when its copies exist) or the float32 one
        (bench/lora_serving.py --f32-lora measures both in one run)."""
        self.c_bf16 = bool(on) and all(p.a16 is not None for per in self.projections for p in per.values())
        self._c_lora = [(None, None, None)] * len(self.layers)  # rebuilt at the next step

    # ---- adapters ------------------------------------------------------------------------------
    def load(self, lora_id: int, w: LoRAWeights) -> None:
        if lora_id in self.slot_of:
            self.unload(lora_id)
        if not self.free_slots:
            raise RuntimeError(f"no free LoRA slot for adapter {lora_id}")  # the engine's registry prevents this
        slot = self.free_slots.pop(0)
        with torch.no_grad():
            for per in self.projections:
                for proj in per.values():
                    proj.a[slot].zero_()
                    proj.b[slot].zero_()
            for (layer, target), (a, b) in w.tensors.items():
                for packed, (_, subs) in PACKED.items():
                    if target in subs:
                        proj = self.projections[layer][packed]
                        i, r = subs.index(target), a.shape[0]
                        k0, o0 = i * proj.rank, proj.offsets[i]
                        proj.a[slot, :, k0:k0 + r].copy_(a.t())
                        proj.b[slot, k0:k0 + r, o0:o0 + proj.outs[i]].copy_(b.t())
            for per in self.projections:
                for proj in per.values():
                    proj.pack_bf16(slot)
        self.slot_of[lora_id] = slot

    def unload(self, lora_id: int) -> None:
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            self.free_slots.append(slot)

    # ---- one step ------------------------------------------------------------------------------
    def begin_step(self, lora_ids: list[int], query_lens: list[int]) -> None:
        """The step's requests' adapter ids (0: base) and token counts, in batch order."""
        slots = [self.slot_of[i] if i else -1 for i in lora_ids]
        if all(s < 0 for s in slots):
            self.layout = None
            return
        self.layout = layout = LoRALayout.build(slots, query_lens, self.device)
        if len(layout.group_spans) == len(layout.groups) and self._fuse_step(layout):
            return
        for layer in self.layers:  # the fused C layer cannot take this step's LoRA rows: the per-op path runs it
            if getattr(layer, "fast_path", None) is not None:
                self._paused_fast_paths.append((layer, layer.fast_path))
                layer.fast_path = None
        if self._paused_fast_paths:
            if not self.unfused_steps:
                logger.info("LoRA steps run the per-op path instead of the fused C layer (counted in "
                            "tokenmill_lora_unfused_steps)")
            self.unfused_steps += 1

    def _fuse_step(self, layout: LoRALayout) -> bool:
        """Hand the step's adapter row spans to every fused C layer (LoRA inside the C call); False if a layer with
        a fast path has no C view of its buffers."""
        layers = []
        for i, layer in enumerate(self.layers):
            fast = getattr(layer, "fast_path", None)
            if fast is None:
                continue
            if self._c_lora[i][0] is not fast:  # built once per installed fast path
                st = self._c_struct(layer, self.projections[i])
                self._c_lora[i] = (fast, st, ctypes.pointer(st) if st is not None else None)
            layers.append((layer, self._c_lora[i][1], self._c_lora[i][2]))
        if not layers:
            return True
        if any(st is None for _, st, _ in layers):
            return False
        spans = sorted((lo, hi - lo, slot) for slot, (lo, hi) in layout.group_spans.items())
        t = torch.tensor(spans, dtype=torch.int64).t().contiguous()  # [3, G]: starts, lens, slots
        self._c_spans = t
        g, starts, lens, slots = t.shape[1], t[0].data_ptr(), t[1].data_ptr(), t[2].data_ptr()
        for layer, st, ptr in layers:
            st.num_groups, st.starts, st.lens, st.slots = g, starts, lens, slots
            layer.fast_path.lora = ptr
            self._fused_lora_layers.append(layer)
        return True

    def end_step(self) -> None:
        self.layout = None
        for layer in self._fused_lora_layers:
            layer.fast_path.lora = None
        self._fused_lora_layers = []
        self._c_spans = None
        for layer, fast in self._paused_fast_paths:
            layer.fast_path = fast
        self._paused_fast_paths = []

    def _hook(self, proj: _Projection) -> Callable:
        def hook(module, inputs, output):
            layout = self.layout
            if layout is None:
                return None
            x = inputs[0]
            self.op(output, x if x.is_contiguous() else x.contiguous(), proj.a, proj.b, layout)
            return output

        return hook


def _c_bf16_fits(model: Any) -> bool:
    """Whether the fused C layer's LoRA term runs in bfloat16: the model's packed linears compute their large calls
    in bfloat16 (dense_gemm_dtype) and the layer library has the AVX512-BF16 kernel."""
    from tokenmill.model.layers.quantized import dense_gemm_dtype

    if dense_gemm_dtype(model) != torch.bfloat16:
        return False
    from tokenmill.ops.cpu.layer import lora_bf16_available

    return lora_bf16_available()


def select_lora_op(device: torch.device) -> Callable[..., None]:
    """CPU: the grouped GEMM path; CUDA: the Triton kernels when triton imports; else the reference."""
    if device.type == "cpu":
        from tokenmill.ops.cpu.lora import lora_grouped_cpu

        return lora_grouped_cpu
    try:
        from tokenmill.ops.lora.triton_lora import lora_triton
    except ImportError:
        return lora_reference
    return lora_triton
