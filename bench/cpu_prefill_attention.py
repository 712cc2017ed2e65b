"""Micro-benchmark: one layer's prefill attention on SmolLM2-135M's shape (9 query / 3 KV heads, head_dim 64, bf16
KV cache, block size 16): bf16 SDPA per request (the CpuAttentionBackend path before the AMX kernel: q and the
gathered K/V in bf16 through reference.paged_attention), the float32 C kernel (csrc/attention.c), and the prefill
kernel (csrc/attention_prefill.c: AMX tiles, or AVX512-BF16's vdpbf16ps in csrc/attention_prefill_bf16.c without
AMX). --kv float32 reads a float32 pool (the GGUF default's KV dtype where it is float32). Cases: 10 prompts of 200
tokens (a served prefill step), one 2000-token prompt, a 200-token chunk over a 2048-token cached prefix. The
variants alternate within each repeat; min and median of each over all calls.

    PYTHONPATH=.:bench python bench/cpu_prefill_attention.py [--threads 2] [--iters 20] [--repeats 3] [--kv bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cpu_attention import make_case  # bench/ is on the path when run as a script
from tokenmill.ops.attention.reference import paged_attention
from tokenmill.ops.cpu.attention import (cpu_paged_attention, cpu_prefill_attention, gather_kv_bf16,
                                         prefill_kernel_name, prefill_kernel_supports)

HKV, D, BS = 3, 64, 16
CASES = {"10x200": [(0, 200)] * 10, "1x2000": [(0, 2000)], "1x200@2048": [(2048, 200)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv", choices=("bfloat16", "float32"), default="bfloat16", help="the KV pool's dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kv_dtype = getattr(torch, args.kv)
    print(f"threads {args.threads}, {args.kv} pool, prefill kernel: {prefill_kernel_name()} "
          f"(runs: {prefill_kernel_supports(kv_dtype, D)})")
    nb = 4096
    kv = torch.randn(2, nb, BS, HKV, D).to(kv_dtype)
    gather = gather_kv_bf16 if kv_dtype == torch.float32 else None  # as CpuAttentionBackend's SDPA path
    for name, reqs in CASES.items():
        q, batch = make_case(reqs, nb, BS)
        scale = D ** -0.5
        variants = {
            "sdpa-bf16": lambda: paged_attention(q.bfloat16(), kv, batch, scale, None, gather).float(),
            "f32-kernel": lambda: cpu_paged_attention(q, kv, batch, scale, None),
            "prefill-kernel": lambda: cpu_prefill_attention(q, kv, batch, scale, None),
        }
        times = {v: [] for v in variants}
        for fn in variants.values():
            fn()
        for _ in range(args.repeats):
            for v, fn in variants.items():
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    fn()
                    times[v].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times["sdpa-bf16"])
        for v, ts in times.items():
            print(f"{name:11s} {v:14s} min {min(ts):7.2f} ms  p50 {statistics.median(ts):7.2f} ms  "
                  f"({base / statistics.median(ts):.2f}x sdpa)")


if __name__ == "__main__":
    main()
