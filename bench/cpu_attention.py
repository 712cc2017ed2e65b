"""Micro-benchmark: compiled CPU paged attention (tokenmill/ops/cpu) vs reference.paged_attention.

SmolLM2-135M's attention shape (9 query heads / 3 KV heads, head_dim 64, fp32 or --kv-dtype KV, block size 16):
decode batches of 1 / 16 / 64 requests at ~260-token contexts, a batch-1 decode at 4k tokens (split-K),
and a 200-token prefill chunk over a 2048-token cached prefix. Times one layer's attention call (the
step pays it 30 times). Blocks are shuffled in a pool as large as the engine's default 1 GiB cache, and the kernel
cycles over 30 such layer pools (as a step does), so one call's K/V is not left in the cache by the call before.

    PYTHONPATH=. python bench/cpu_attention.py [--threads 2] [--iters 30] [--kv-dtype float32|bfloat16|float16]
        [--cases decode]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch

from tokenmill.ops.attention.reference import paged_attention
from tokenmill.ops.cpu.attention import cpu_attention_available, cpu_paged_attention
from tokenmill.worker.forward_batch import ForwardBatch, build_forward_batch

H, HKV, D = 9, 3, 64


def make_case(reqs: list[tuple[int, int]], num_blocks: int, BS: int, seed: int = 0) -> tuple[torch.Tensor, ForwardBatch]:
    """q and a ForwardBatch for (cached, new) token counts; block ids drawn at random from the pool."""
    rng = random.Random(seed)
    pool = rng.sample(range(num_blocks), sum(-(-(c + n) // BS) for c, n in reqs))
    tables, toks, done = [], [], []
    for c, n in reqs:
        k = -(-(c + n) // BS)
        tables.append(pool[:k])
        pool = pool[k:]
        toks.append([0] * n)
        done.append(c)
    batch = build_forward_batch(toks, done, tables, BS)
    return torch.randn(batch.num_tokens, H, D), batch


def time_ms(fn: Callable[[], torch.Tensor], iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts)  # min: the machine may be shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cases", default="", help="only the cases whose name contains this")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block (the engine's --block-size)")
    a = ap.parse_args()
    BS = a.block_size
    dtype = getattr(torch, a.kv_dtype)
    torch.set_num_threads(a.threads)
    if not cpu_attention_available():
        raise SystemExit("the CPU attention kernel cannot be built on this machine")
    num_blocks = (1 << 30) // (2 * BS * HKV * D * 4 * 30)  # one layer's share of a 1 GiB, 30-layer cache
    layers = [torch.randn(2, num_blocks, BS, HKV, D).to(dtype) for _ in range(30)]
    kv = layers[0]
    rng = random.Random(1)
    cases = {
        "decode b=1, ctx 260": [(259, 1)],
        "decode b=16, ctx ~260": [(rng.randrange(230, 290), 1) for _ in range(16)],
        "decode b=64, ctx ~260": [(rng.randrange(230, 290), 1) for _ in range(64)],
        "decode b=1, ctx 4096": [(4095, 1)],
        "prefill 200 over 2048 cached": [(2048, 200)],
        "prefill 200 + 15 decodes": [(2048, 200)] + [(rng.randrange(230, 290), 1) for _ in range(15)],
    }
    print(f"threads={a.threads}  H={H} Hkv={HKV} D={D} block={BS} {a.kv_dtype} KV, pool {num_blocks} blocks x 30 "
          f"layers; ms per layer call")
    print(f"| case | reference ms | cpu kernel ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for name, reqs in cases.items():
        if a.cases not in name:
            continue
        q, batch = make_case(reqs, num_blocks, BS)
        scale = D ** -0.5

        def all_layers() -> None:
            for layer_kv in layers:
                cpu_paged_attention(q, layer_kv, batch, scale, None)

        ref = float("nan") if a.no_reference else time_ms(
            lambda: paged_attention(q, kv.float(), batch, scale, None), max(1, a.iters // 10))
        ker = time_ms(all_layers, max(1, a.iters // 10)) / len(layers)
        err = (cpu_paged_attention(q, kv, batch, scale, None) - paged_attention(q, kv.float(), batch, scale, None)).abs().max()
        print(f"| {name} | {ref:.3f} | {ker:.3f} | {ref / ker:.1f}x | {float(err):.1e} |")


if __name__ == "__main__":
    main()
