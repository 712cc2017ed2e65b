"""Batched heterogeneous LoRA (Punica's SGMV / BGMV): one step's rows use different adapters, or none.

Layout shared by every implementation: for one packed projection, `a` [S, in, K] and `b` [S, K, out] hold the
S adapter slots (K = slices * max_rank, `b` block-diagonal over the packed slices, scaling folded in); a step's
LoRALayout says which slot each row uses (-1: the base model). Each op adds x @ a[slot] @ b[slot] to y in place.
reference.py  pure PyTorch (the oracle): BGMV for decode rows, SGMV for prompt segments
triton_lora.py  the same as Triton kernels (CUDA; tested under TRITON_INTERPRET=1)
tokenmill/ops/cpu/lora.py  the CPU path: one GEMM pair per adapter present in the step
"""
from tokenmill.ops.lora.reference import LoRALayout, bgmv_reference, lora_reference, sgmv_reference

__all__ = ["LoRALayout", "bgmv_reference", "sgmv_reference", "lora_reference"]
