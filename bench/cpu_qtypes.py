"""Micro-benchmark: the packed kernel (tokenmill/ops/cpu/qlinear) per GGUF block type, by rows per call, on
Llama-3.2-1B-like shapes (rows of 2048 / 8192 weights: whole k-quant super-blocks), against a dense float32 copy
(MKL sgemm). Random packed blocks (the speed does not depend on the values). ms per call of all four linears of one
layer; `--layers` distinct layers cycle so the weights stream from memory as in a real step.

    PYTHONPATH=. python bench/cpu_qtypes.py [--threads 2] [--layers 8] [--rows 1,3,16,64] [--types q4_1,q4_k,...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tokenmill.ops.cpu.qlinear import QTYPES, amx_available, dequantize, qlinear, row_bytes

# (in, out) of qkv_proj, o_proj, gate_up_proj, down_proj
SHAPES = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)]


def random_packed(qtype: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Random blocks with small float16 scales (valid, finite weights)."""
    kind, nbytes, qk = QTYPES[qtype]
    raw = torch.randint(0, 256, (n, k // qk, nbytes), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // qk, 1, generator=g) * 0.01).half().view(torch.uint8)  # [n, nb, 2]
    offsets = {"q6_k": (208,)}.get(qtype, (0, 2) if qtype in ("q4_1", "q5_1", "q4_k", "q5_k") else (0,))
    for off in offsets:
        raw[..., off:off + 2] = scale
    return raw.reshape(n, row_bytes(qtype, k))


def timeit(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,3,16,64")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--types", default="q4_0,q4_1,q8_0,q5_0,q4_k,q5_k,q6_k")
    ap.add_argument("--dense", action="store_true", help="also time a dense float32 copy (4 bytes a weight)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"threads {args.threads}, layers {args.layers}, AMX: {amx_available()}; ms per layer (4 linears)")
    print("type   bits/w " + " ".join(f"{m:>8}" for m in rows))
    for qtype in args.types.split(","):
        layers = [[(k, random_packed(qtype, n, k, g)) for k, n in SHAPES] for _ in range(args.layers)]
        bits = 8 * QTYPES[qtype][1] / QTYPES[qtype][2]
        out = []
        for m in rows:
            xs = {k: torch.randn(m, k) for k, _ in SHAPES}
            state = {"i": 0}

            def step() -> None:
                layer = layers[state["i"] % len(layers)]
                state["i"] += 1
                for k, q in layer:
                    qlinear(xs[k], q, qtype)
            out.append(timeit(step, args.iters) * 1e3)
        print(f"{qtype:6} {bits:6.2f} " + " ".join(f"{t:8.2f}" for t in out))
        if args.dense and qtype == args.types.split(",")[0]:
            dense = [[(k, dequantize(q, qtype, k)) for k, q in layer] for layer in layers[:2]]
            res = []
            for m in rows:
                xs = {k: torch.randn(m, k) for k, _ in SHAPES}
                state = {"i": 0}

                def dstep() -> None:
                    layer = dense[state["i"] % len(dense)]
                    state["i"] += 1
                    for k, w in layer:
                        F.linear(xs[k], w)
                res.append(timeit(dstep, args.iters) * 1e3)
            print(f"{'f32':6} {32:6.2f} " + " ".join(f"{t:8.2f}" for t in res))


if __name__ == "__main__":
    main()
