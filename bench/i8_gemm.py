"""Micro-benchmark of a GGUF's block-quantized linears on a CPU without AMX: SmolLM2-135M's shapes (Q4_1 layers, a
Q8_0 head, random weights), by rows per call. `packed`: the packed-block kernel (qlinear; what 1-3 rows run); `bf16`:
the AVX512-BF16 panels (csrc/qlinear_bf16.c, the blocks dequantized to bf16 once); `i8`: the int8 panels
(csrc/qlinear_i8gemm.c, requantized to int8 per 64 k's, x per row and 64 k's). A layer is what the fused C layer
runs: q|k|v, o, gate|up with the silu(gate) * up epilogue (glu_linear), down, cycling through `--layers` layers'
weights (ms per layer); the head (49152 x 576) is one weight (ms per call).

    PYTHONPATH=. python bench/i8_gemm.py [--threads 2] [--layers 30] [--rows 1,4,8,16,64,256,2000]
        [--kinds packed,bf16,i8]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from tokenmill.ops.cpu.qlinear import amx_pack, glu_linear, i8_pack, qlinear

from cpu_gemm import timeit  # median seconds of fn (bench/ is on the path when run as a script)

# (in, out, glu) of qkv_proj, o_proj, gate_up_proj, down_proj; the LM head
SHAPES = [(576, 960, 0), (576, 576, 0), (576, 3072, 1536), (1536, 576, 0)]
HEAD = (576, 49152, 0)


def weight(k: int, n: int, glu: int, qtype: str, rng) -> tuple:
    from gguf import GGMLQuantizationType as G
    from gguf.quants import quantize

    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    q = torch.from_numpy(np.ascontiguousarray(quantize(w, G[qtype.upper()])).view(np.uint8)).reshape(n, -1)
    keep_b, st_b = amx_pack(q, qtype, k, glu=glu)
    keep_i, st_i = i8_pack(q, qtype, k, glu=glu)
    return k, glu, qtype, q, (keep_b, st_b), (keep_i, st_i)


def run(kind: str, xs, ws) -> None:
    with torch.inference_mode():
        for x, (k, glu, qtype, q, b, i) in zip(xs, ws):
            if kind == "packed":
                qlinear(x, q, qtype)
                continue
            st = b[1] if kind == "bf16" else i[1]
            if glu:
                glu_linear(x, st, None, amx_min_rows=1)
            else:
                qlinear(x, q, qtype, amx_min_rows=1, qpanels=st)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,8,16,64,256,2000")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kinds", default="packed,bf16,i8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layers = [weight(k, n, glu, "q4_1", rng) for _ in range(args.layers) for k, n, glu in SHAPES]
    head = [weight(*HEAD, "q8_0", rng)]
    kinds = args.kinds.split(",")
    print(f"threads {args.threads}, layers {args.layers}, torch {torch.__version__}")
    for name, ws, per in (("layer (4 linears, Q4_1)", layers, args.layers), ("head 49152x576 Q8_0", head, 1)):
        print(f"{name}\n{'rows':>6} " + " ".join(f"{k + ' ms':>10}" for k in kinds) + "  bf16/i8")
        for m in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(m, k) for k, *_ in ws]
            iters = max(3, args.iters if m <= 64 else args.iters // 3)
            t = {}
            for kind in kinds:
                if kind == "packed" and m > 64:
                    continue  # the float32 buffered kernel: far behind at prefill sizes
                t[kind] = timeit(lambda: run(kind, xs, ws), iters) / per
            ratio = f"{t['bf16'] / t['i8']:.2f}" if "bf16" in t and "i8" in t else "-"
            print(f"{m:>6} " + " ".join(f"{t[k] * 1e3:>10.3f}" if k in t else f"{'-':>10}" for k in kinds)
                  + f"  {ratio}", flush=True)


if __name__ == "__main__":
    main()
