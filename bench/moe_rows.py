"""Micro-benchmark: one OLMoE-shaped MoE layer (64 experts, hidden 2048, expert intermediate 1024, top 8) through
the fused CPU op (csrc/moe.c) with every expert given exactly m rows (T = 8m tokens), by m and by the path an
expert's rows take: `f32` (--gemm-dtype float32: the exact float32 kernels), `auto` (what gemm auto runs now,
tokenmill/model/layers/quantized.py's moe_switch_rows), `before` (the switch before the AMX int8 tiles: VNNI for
1-3 rows, AMX bf16 from 4), and `i8` / `amxi8` / `amx` (gemm auto with every expert forced onto the VNNI
int8-activation tiles / the AMX int8 tiles / the AMX bf16 tiles; without AMX, `amx` is the AVX512-BF16 panels
dequantized per task and `amxi8` the VNNI tiles). Random packed blocks (speed does not depend on
the values): gate|up Q4_K, down Q6_K or Q4_K (llama.cpp's Q4_K_M has both). ms per layer call, the fastest of
--iters (the box is shared: the minimum is the least disturbed run). `GB/s` is the layer's packed expert bytes (every
expert is active) over the best mode's time: how close the call comes to streaming the weights once.

    PYTHONPATH=. python bench/moe_rows.py [--rows 1,2,4,8,16,64] [--down q6_k,q4_k] [--modes f32,before,auto,i8,amxi8,amx]
        [--small-pages]
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from bench.cpu_qtypes import random_packed
from tokenmill.model.layers.moe import _host_tensor
from tokenmill.model.layers.quantized import moe_switch_rows
from tokenmill.ops.cpu.qlinear import amx_available
from tokenmill.ops.moe.cpu import MoEWorkspace, fused_moe_cpu

E, H, I, TOPK = 64, 2048, 1024, 8
BIG = 1 << 30


def experts(down: str, g: torch.Generator, huge_pages: bool) -> SimpleNamespace:
    w13 = torch.stack([random_packed("q4_k", 2 * I, H, g) for _ in range(E)])  # [E, 2I, rb(H)]
    w2 = torch.stack([random_packed(down, H, I, g) for _ in range(E)])  # [E, H, rb(I)]
    if huge_pages:  # where a model's PackedExperts keep them
        w13, w2 = (_host_tensor(*w.shape, dtype=w.dtype).copy_(w) for w in (w13, w2))
    return SimpleNamespace(qtype="q4_k", down_qtype=down, gate_up_proj=w13, down_proj=w2, intermediate_size=I,
                           num_experts=E, amx_min_rows=0, i8_max_rows=0, amx_i8_min_rows=0,
                           workspace=MoEWorkspace())  # as finalize_quantized gives a model's experts


def mode_rows(mode: str) -> tuple[int, int, int]:
    """(amx_min_rows, i8_max_rows, amx_i8_min_rows) of a mode."""
    return {"f32": (0, 0, 0), "auto": moe_switch_rows(), "before": (4, 3, 0), "i8": (BIG, BIG, 0),
            "amxi8": (BIG, BIG, 1), "amx": (1, 0, 0)}[mode]


def timeit(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,32,64")
    ap.add_argument("--down", default="q6_k,q4_k")
    ap.add_argument("--modes", default="f32,auto,i8,amxi8,amx")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--small-pages", action="store_true",
                    help="keep the experts on 4 KiB pages (a model's packed experts ask for 2 MiB ones)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    modes = args.modes.split(",")
    print(f"threads {args.threads}, {'4 KiB' if args.small_pages else '2 MiB'} pages, AMX: {amx_available()}, auto (amx_min_rows, i8_max_rows) = {moe_switch_rows()}; "
          f"ms per layer call (E={E}, H={H}, I={I}, top {TOPK}, every expert m rows)")
    for down in args.down.split(","):
        ex = experts(down, g, not args.small_pages)
        nbytes = ex.gate_up_proj.numel() + ex.down_proj.numel()
        print(f"gate|up q4_k, down {down}: {nbytes / 1e6:.1f} MB of packed experts per layer")
        print("   m    T " + " ".join(f"{m:>9}" for m in modes) + "   best   GB/s")
        for m in rows:
            t = TOPK * m * E // 64
            x = torch.randn(t, H, generator=g)
            ids = (torch.arange(t * TOPK) % E).reshape(t, TOPK)  # each expert exactly m pairs
            w = torch.full((t, TOPK), 1.0 / TOPK)
            res = {}
            for mode in modes:
                ex.amx_min_rows, ex.i8_max_rows, ex.amx_i8_min_rows = mode_rows(mode)
                res[mode] = timeit(lambda: fused_moe_cpu(x, ex, w, ids), args.iters) * 1e3
            best = min(res, key=res.get)
            print(f"{m:>4} {t:>4} " + " ".join(f"{res[k]:>9.2f}" for k in modes)
                  + f"   {best:<6} {nbytes / res[best] / 1e6:5.1f}")


if __name__ == "__main__":
    main()
