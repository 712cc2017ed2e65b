"""Times the AMX bf16 linears (csrc/qlinear_amx.c, tiles made once) on SmolLM2-135M's shapes and reports GFLOP/s
against the tile unit's peak (2 cores x 2.6 GHz x 1024 bf16 flop a cycle; a tdpbf16ps, 16 x 16 x 32 multiply-adds, issues every 16 cycles).

    PYTHONPATH=. python bench/amx_gemm_shapes.py [--rows 64,2000] [--reps 50] [--threads 2]

Random bf16 tiles (the values do not change the tile unit's speed); qkv [960 x 576], o [576 x 576], gate|up with
the GLU epilogue [2 x 1536 x 576] (and plain), down [576 x 1536], LM head [49152 x 576].
"""
from __future__ import annotations

import argparse
import ctypes
import time

import torch

from tokenmill.ops.cpu.qlinear import _lib, amx_available

SHAPES = [("qkv", 960, 576, 0), ("o", 576, 576, 0), ("gate|up glu", 3072, 576, 1536), ("gate|up", 3072, 576, 0),
          ("down", 576, 1536, 0), ("lm head", 49152, 576, 0)]
PEAK = 2 * 2.6e9 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,2000")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = _lib()
    assert lib is not None and amx_available()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.tm_qlinear_amx_panels.argtypes = [p, p, i64, i64, i64, p, p, i64, i64]
    lib.tm_qlinear_amx_glu.argtypes = [p, p, i64, i64, i64, p, p]
    torch.manual_seed(0)
    for m in [int(v) for v in args.rows.split(",")]:
        total_t = total_f = 0.0
        for name, n, k, glu in SHAPES:
            words = lib.tm_qlinear_amx_panel_words(k, n)
            panels = (torch.randn(words * 2) * 0.05).to(torch.bfloat16).view(torch.int32)
            x = torch.randn(m, k)
            y = torch.empty(m, glu if glu else n)
            reps = max(3, args.reps * 64 // m // (8 if n > 10000 else 1))

            def call():
                if glu:
                    return lib.tm_qlinear_amx_glu(panels.data_ptr(), x.data_ptr(), m, k, glu, None, y.data_ptr())
                return lib.tm_qlinear_amx_panels(panels.data_ptr(), x.data_ptr(), m, k, n, None, y.data_ptr(), n, 0)

            assert call() == 0
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t0)
            ts.sort()
            t = ts[len(ts) // 2]
            fl = 2.0 * m * n * k
            if name != "gate|up":
                total_t += t * (1 if name == "lm head" else 30)
                total_f += fl * (1 if name == "lm head" else 30)
            print(f"M={m:5d} {name:12s} N={n:6d} K={k:5d}: p50 {t * 1e6:9.1f} us  min {ts[0] * 1e6:9.1f} us  "
                  f"{fl / t / 1e9:7.0f} GFLOP/s  {fl / t / PEAK * 100:5.1f}% of peak  "
                  f"tiles {words * 4 / t / 1e9:5.1f} GB/s")
        print(f"M={m:5d} step's linears (30 layers qkv+o+glu+down, + head): {total_t * 1e3:.2f} ms, "
              f"{total_f / total_t / 1e9:.0f} GFLOP/s, {total_f / total_t / PEAK * 100:.1f}% of peak")


if __name__ == "__main__":
    main()
