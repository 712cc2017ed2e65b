"""The CPU path of batched LoRA: one GEMM pair per adapter present in the step, over that adapter's rows (a
contiguous slice where its rows are adjacent, else a gather / index_add). At most max_loras adapters run in a
step, so a step costs at most max_loras small GEMM pairs per projection, whatever the mix of decode rows and
prompt segments. Tested against tokenmill/ops/lora/reference.py.

This op is the per-op path's (the hooks of tokenmill/lora/runtime.py); the fused C decoder layer (ops/cpu/layer.py)
adds the same term inside its call (csrc/lora.c). LoRARuntime counts the LoRA steps that leave the fused layer
(tokenmill_lora_unfused_steps in /metrics, logged once); bench/lora_serving.py measures what LoRA costs against
the base model alone.
"""
from __future__ import annotations

import torch

from tokenmill.ops.lora.reference import LoRALayout

Tensor = torch.Tensor


def lora_grouped_cpu(y: Tensor, x: Tensor, a: Tensor, b: Tensor, layout: LoRALayout) -> None:
    """y += per-row x @ a[slot] @ b[slot] (rows of slot -1 untouched), in place."""
    for slot, rows in layout.groups.items():
        span = layout.group_spans.get(slot)
        if span is not None:
            lo, hi = span
            y[lo:hi].addmm_(torch.mm(x[lo:hi], a[slot]), b[slot])
        else:
            d = torch.mm(torch.mm(x.index_select(0, rows), a[slot]), b[slot])
            y.index_add_(0, rows, d)
