"""Micro-benchmark: one decoder layer's four linears (SmolLM2-135M shapes, Q4_1 blocks) by rows per call:
the packed kernel (tokenmill/ops/cpu/qlinear) vs a dense float32 copy (MKL sgemm) vs a dense bfloat16 copy
(oneDNN: AMX or AVX512-BF16 where the CPU has them). Shows where `QuantizedLinear.dense_min_rows` should sit
and what `--gemm-dtype` buys for prefill.

    PYTHONPATH=. python bench/cpu_gemm.py [--threads 2] [--rows 1,4,16,32,48,64,128,512,2048]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quantize

from tokenmill.model.layers.quantized import cpu_has_bf16_matmul
from tokenmill.ops.cpu.qlinear import dequantize, qlinear

# (in, out) of qkv_proj, o_proj, gate_up_proj, down_proj
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def packed_weight(k: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(quantize(w, GGMLQuantizationType.Q4_1))).reshape(n, -1)


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
    ap.add_argument("--rows", default="1,4,16,32,48,64,128,512,2048")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layers = []
    for k, n in SHAPES:
        q = packed_weight(k, n, rng)
        w32 = dequantize(q, "q4_1", k)
        layers.append((k, q, w32, w32.to(torch.bfloat16)))
    print(f"threads {args.threads}, bf16 matrix instructions: {cpu_has_bf16_matmul()}, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    print(f"{'rows':>6} {'packed ms':>10} {'f32 ms':>8} {'bf16 ms':>8} {'bf16 GFLOP/s':>13}  fastest")
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, k) for k, *_ in layers]

        def run(kind: str) -> None:
            with torch.inference_mode():
                for x, (k, q, w32, w16) in zip(xs, layers):
                    if kind == "packed":
                        qlinear(x, q, "q4_1")
                    elif kind == "f32":
                        F.linear(x, w32)
                    else:
                        F.linear(x.to(torch.bfloat16), w16).float()

        iters = max(3, args.iters if m <= 128 else args.iters // 4)
        t = {kind: timeit(lambda: run(kind), iters) for kind in ("packed", "f32", "bf16")}
        flops = 2 * m * sum(k * n for k, n in SHAPES)
        best = min(t, key=t.get)
        print(f"{m:>6} {t['packed'] * 1e3:>10.3f} {t['f32'] * 1e3:>8.3f} {t['bf16'] * 1e3:>8.3f} "
              f"{flops / t['bf16'] / 1e9:>13.1f}  {best}")


if __name__ == "__main__":
    main()
