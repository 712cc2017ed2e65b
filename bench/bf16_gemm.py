"""Micro-benchmark for a bf16 checkpoint's linears on a CPU without AMX: SmolLM2-135M's shapes, bf16 weights, by
rows per call. `packed`: the float32 packed kernel over the 2-byte weights (qlinear, the fused layer's path before
csrc/qlinear_bf16.c); `dot`: the AVX512-BF16 panels (csrc/qlinear_bf16.c, x rounded to bf16); `onednn`: F.linear
on a bf16 copy (x rounded to bf16, bf16 output cast back: QuantizedLinear's dense copy / the per-op bf16 model).
The four layer linears cycle through `--layers` layers' distinct weights (ms per layer); the head (49152 x 576) is
one weight (ms per call).

    PYTHONPATH=. python bench/bf16_gemm.py [--threads 2] [--layers 30] [--rows 1,4,16,64,256,2000]
        [--kinds packed,dot,onednn]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tokenmill.ops.cpu.qlinear import amx_pack, panels_available, qlinear

from cpu_gemm import timeit  # median seconds of fn (bench/ is on the path when run as a script)

# (in, out) of qkv_proj, o_proj, gate_up_proj, down_proj; the LM head
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
HEAD = (576, 49152)


def weight(k: int, n: int) -> tuple:
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    q = w.contiguous().view(torch.uint8).reshape(n, 2 * k)
    panels, st = amx_pack(q, "bf16", k)
    return k, w, q, panels, st


def run(kind: str, xs, ws) -> None:
    with torch.inference_mode():
        for x, (k, w, q, _, st) in zip(xs, ws):
            if kind == "packed":
                qlinear(x, q, "bf16")
            elif kind == "dot":
                qlinear(x, q, "bf16", amx_min_rows=1, qpanels=st)
            else:
                F.linear(x.to(torch.bfloat16), w).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,16,64,256,2000")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kinds", default="packed,dot,onednn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assert panels_available("bf16"), "no AMX / AVX512-BF16 panels on this CPU"
    layers = [weight(k, n) for _ in range(args.layers) for k, n in SHAPES]
    head = [weight(*HEAD)]
    kinds = args.kinds.split(",")
    print(f"threads {args.threads}, layers {args.layers}, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()})")
    for name, ws, per in (("layer (4 linears)", layers, args.layers), ("head 49152x576", head, 1)):
        print(f"{name}\n{'rows':>6} " + " ".join(f"{k + ' ms':>10}" for k in kinds) + "  fastest")
        for m in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(m, k) for k, *_ in ws]
            iters = max(3, args.iters if m <= 64 else args.iters // 3)
            t = {}
            for kind in kinds:
                if kind == "packed" and m > 64:
                    continue  # the float32 buffered kernel: far behind at prefill sizes
                t[kind] = timeit(lambda: run(kind, xs, ws), iters) / per
            best = min(t, key=t.get)
            print(f"{m:>6} " + " ".join(f"{t[k] * 1e3:>10.3f}" if k in t else f"{'-':>10}" for k in kinds)
                  + f"  {best}", flush=True)


if __name__ == "__main__":
    main()
