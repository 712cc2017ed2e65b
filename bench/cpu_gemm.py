"""Micro-benchmark: the decoder layers' four linears (SmolLM2-135M shapes, Q4_1 blocks) by rows per call:
the packed kernel (tokenmill/ops/cpu/qlinear, float32) vs its AMX bf16 path (where the CPU has AMX) vs a dense
float32 copy (MKL sgemm) vs a dense bfloat16 copy (oneDNN: AMX or AVX512-BF16 where the CPU has them). Shows
where `QuantizedLinear.dense_min_rows` / `AMX_MIN_ROWS` should sit and what `--gemm-dtype` buys.
`--layers 30` (default) cycles through 30 layers' distinct weights, so they stream from memory as in a real
step; `--layers 1` keeps one layer's weights cache-resident (the figures of session 4). ms are per layer.

    PYTHONPATH=. python bench/cpu_gemm.py [--threads 2] [--layers 30] [--rows 1,4,16,32,48,64,128,512,2048]
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
from tokenmill.ops.cpu.qlinear import amx_available, dequantize, qlinear

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
    ap.add_argument("--layers", type=int, default=30, help="distinct layers' weights to cycle through")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(args.layers):
        for k, n in SHAPES:
            q = packed_weight(k, n, rng)
            w32 = dequantize(q, "q4_1", k)
            layers.append((k, q, w32, w32.to(torch.bfloat16)))
    amx = amx_available()
    kinds = ["packed"] + (["amx"] if amx else []) + ["f32", "bf16"]
    print(f"threads {args.threads}, layers {args.layers}, bf16 matrix instructions: {cpu_has_bf16_matmul()}, "
          f"AMX path: {amx}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    print(f"{'rows':>6} " + " ".join(f"{k + ' ms':>10}" for k in kinds) + "  fastest")
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, k) for k, *_ in layers[:len(SHAPES)]] * args.layers

        def run(kind: str) -> None:
            with torch.inference_mode():
                for x, (k, q, w32, w16) in zip(xs, layers):
                    if kind == "packed":
                        qlinear(x, q, "q4_1")
                    elif kind == "amx":
                        qlinear(x, q, "q4_1", amx_min_rows=1)
                    elif kind == "f32":
                        F.linear(x, w32)
                    else:
                        F.linear(x.to(torch.bfloat16), w16).float()

        iters = max(3, args.iters if m <= 128 else args.iters // 4)
        t = {kind: timeit(lambda: run(kind), iters) / args.layers for kind in kinds}
        best = min(t, key=t.get)
        print(f"{m:>6} " + " ".join(f"{t[k] * 1e3:>10.3f}" for k in kinds) + f"  {best}")


if __name__ == "__main__":
    main()
