"""Micro-benchmark of the Triton paged-attention kernels on a GPU (Llama-3-8B attention shape by default).

    python bench/gpu_attention.py                       # decode sweep + prefill, prints a table
    python bench/gpu_attention.py --check               # also compare each case with the reference

Decode is memory-bound: the figure of merit is KV bytes read per second against the copy bandwidth
(bench/gpu_roofline.py measures it). Prefill is compute-bound: attention FLOP/s against the matmul rate.
"""
from __future__ import annotations

import argparse
import math

import torch

from tokenmill.ops.attention import reference as R
from tokenmill.ops.attention.triton_attention import TritonAttentionBackend
from tokenmill.worker.forward_batch import build_forward_batch


def _time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def _setup(batch: int, ctx: int, q_len: int, h: int, hkv: int, d: int, bs: int, dtype):
    nblk = -(-ctx // bs)
    kv = torch.randn((2, batch * nblk + 1, bs, hkv, d), device="cuda", dtype=dtype)
    tables = [[1 + i * nblk + j for j in range(nblk)] for i in range(batch)]
    fb = build_forward_batch([[1] * q_len] * batch, [ctx - q_len] * batch, tables, bs, device="cuda")
    q = torch.randn(batch * q_len, h, d, device="cuda", dtype=dtype)
    return kv, fb, q


def _err(be: TritonAttentionBackend, q, kv, fb, scale) -> str:
    got = be.attention(q, kv, fb, scale).float()
    return f"{(got - R.paged_attention(q, kv, fb, scale).float()).abs().max():.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--check", action="store_true", help="compare with reference.paged_attention")
    a = ap.parse_args()
    h, hkv, d, bs, dt = a.heads, a.kv_heads, a.head_dim, a.block_size, torch.bfloat16
    scale = 1 / math.sqrt(d)
    print("| case | splits | time | KV GB/s or attn TFLOP/s | max err vs ref |")
    print("|---|---|---|---|---|")
    for batch, ctx in [(1, 1024), (1, 8192), (1, 32768), (8, 8192), (64, 2048), (256, 1024)]:
        kv, fb, q = _setup(batch, ctx, 1, h, hkv, d, bs, dt)
        for splits in (None, 1):
            be = TritonAttentionBackend(decode_num_splits=splits)
            n = be.splits_for(batch, hkv, ctx, q.device)
            s = _time(lambda: be.attention(q, kv, fb, scale))
            gbs = batch * ctx * hkv * d * 2 * kv.element_size() / s / 1e9
            err = _err(be, q, kv, fb, scale) if a.check else ""
            print(f"| decode b={batch} ctx={ctx} | {n} | {s * 1e6:.1f} us | {gbs:,.0f} GB/s | {err} |")
    for batch, ctx, q_len in [(1, 4096, 4096), (8, 2048, 512), (4, 8192, 2048)]:
        kv, fb, q = _setup(batch, ctx, q_len, h, hkv, d, bs, dt)
        be = TritonAttentionBackend()
        s = _time(lambda: be.attention(q, kv, fb, scale), iters=10)
        flops = batch * 4 * h * d * sum(ctx - q_len + i + 1 for i in range(q_len))
        err = _err(be, q, kv, fb, scale) if a.check else ""
        print(f"| prefill b={batch} ctx={ctx} q={q_len} | - | {s * 1e3:.2f} ms | {flops / s / 1e12:,.0f} TFLOP/s | {err} |")


if __name__ == "__main__":
    main()
