"""Where a multi-LoRA step's time goes, per projection: the base linear (the fused C layer's qlinear_any) beside
its batched LoRA term (csrc/lora.c tm_lora_apply: the bfloat16 kernel when the runtime packed bfloat16 copies, and
the float32 kernel on the same buffers) and the PyTorch op (ops/cpu/lora.py), side by side in one run, on layer 0
of the default model (or --model) with --adapters adapters of rank --rank on all seven projections (random
weights), at M rows spread over the adapters in equal contiguous spans. One layer's buffers, called again and again:
cache-warm, so this is the kernels' compute. Then the step's shape: every layer's four linears and LoRA terms
one after another (each layer's own weights and adapter buffers, streamed from memory as in a decode step),
timed as base linears only, LoRA terms only, and both interleaved (base then LoRA per projection).

    PYTHONPATH=. python bench/lora_kernel.py [--rows 16,64,512] [--threads 2] [--out results.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_serving import run, write_adapter  # noqa: E402

from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.lora.request import LoRARequest  # noqa: E402
from tokenmill.lora.runtime import PACKED  # noqa: E402
from tokenmill.ops.cpu.layer import TmLoRA  # noqa: E402
from tokenmill.ops.cpu.lora import lora_grouped_cpu  # noqa: E402
from tokenmill.ops.cpu.qlinear import DIRECT_MAX_ROWS  # noqa: E402
from tokenmill.ops.lora.reference import LoRALayout  # noqa: E402


def best_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]  # median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", default="16,64,512")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = EngineConfig.from_kwargs(model=args.model, num_threads=args.threads, enable_lora=True,
                                   max_loras=args.adapters, max_lora_rank=args.rank, enable_prefix_caching=False)
    engine = LLMEngine.from_config(cfg)
    tmp = tempfile.mkdtemp(prefix="lora_kbench_")
    loras = []
    for i in range(args.adapters):
        path = os.path.join(tmp, f"a{i}")
        write_adapter(path, engine.lora_shapes, args.rank, seed=i)
        loras.append(LoRARequest(f"a{i}", i + 1, path))
        engine.add_lora(loras[-1])
    run(engine, [[100, 200, 300]] * len(loras), loras, 1)  # a step carries the adapters into their slots
    runner = engine.core.executor._runner
    rt = runner.lora
    layer = runner.model.model.layers[0]
    fast = layer.fast_path
    lib = fast.shared.lib
    lib.tm_lora_apply.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.tm_lora_apply.restype = ctypes.c_int
    lib.qlinear_any.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.qlinear_any.restype = ctypes.c_int
    st = rt._c_struct(layer, rt.projections[0])
    st32 = rt._c_struct(layer, rt.projections[0])
    for p in st32.proj:
        p.a16 = p.b16 = None
    slots = sorted(rt.slot_of.values())
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
               platform.machine(), "args": vars(args), "amx_min_rows": fast.amx_min_rows, "lora_bf16": rt.c_bf16,
               "runs": []}
    torch.manual_seed(0)
    for m in [int(r) for r in args.rows.split(",")]:
        per = m // len(slots)
        spans = [(g * per, per if g < len(slots) - 1 else m - g * per, s) for g, s in enumerate(slots)]
        t = torch.tensor(spans, dtype=torch.int64).t().contiguous()
        for s_ in (st, st32):
            s_.num_groups, s_.starts, s_.lens, s_.slots = t.shape[1], t[0].data_ptr(), t[1].data_ptr(), t[2].data_ptr()
        req_slots = [s for _, n, s in spans]
        layout = LoRALayout.build(req_slots, [n for _, n, _ in spans])
        tot = {"base": 0.0, "lora_c": 0.0, "lora_c_f32": 0.0, "lora_torch": 0.0}
        for which, name in enumerate(PACKED):
            proj = rt.projections[0][name]
            fin, fout = proj.a.shape[1], proj.b.shape[2]
            qt, w, b = fast.linears[3 * which:3 * which + 3]
            x = torch.randn(m, fin)
            y = torch.zeros(m, fout)
            base = best_ms(lambda: lib.qlinear_any(qt, x.data_ptr(), m, fin, w, fout, b, y.data_ptr(),
                                                   DIRECT_MAX_ROWS, fast.amx_min_rows), args.reps)
            lc = best_ms(lambda: lib.tm_lora_apply(ctypes.byref(st), which, x.data_ptr(), 0, m, fin, y.data_ptr(),
                                                   fout), args.reps)
            lf = best_ms(lambda: lib.tm_lora_apply(ctypes.byref(st32), which, x.data_ptr(), 0, m, fin, y.data_ptr(),
                                                   fout), args.reps)
            lt = best_ms(lambda: lora_grouped_cpu(y, x, proj.a, proj.b, layout), args.reps)
            row = {"rows": m, "proj": name, "in": fin, "out": fout, "k": proj.a.shape[2], "base_ms": base,
                   "lora_c_ms": lc, "lora_c_f32_ms": lf, "lora_torch_ms": lt}
            results["runs"].append(row)
            tot["base"] += base
            tot["lora_c"] += lc
            tot["lora_c_f32"] += lf
            tot["lora_torch"] += lt
            print(f"M={m:4d} {name:13s} base {base:7.3f} ms  lora C {lc:7.3f} ms  lora C f32 {lf:7.3f} ms  "
                  f"lora torch {lt:7.3f} ms", flush=True)
        print(f"M={m:4d} all four      base {tot['base']:7.3f} ms  lora C {tot['lora_c']:7.3f} ms  lora C f32 "
              f"{tot['lora_c_f32']:7.3f} ms  lora torch {tot['lora_torch']:7.3f} ms  (lora C / base "
              f"{tot['lora_c'] / tot['base']:.2f}, f32 {tot['lora_c_f32'] / tot['base']:.2f})", flush=True)
    layers = runner.model.model.layers
    structs = [rt._c_struct(ly, rt.projections[i]) for i, ly in enumerate(layers)]
    for m in [int(r) for r in args.rows.split(",")]:
        per = m // len(slots)
        spans = [(g * per, per if g < len(slots) - 1 else m - g * per, s) for g, s in enumerate(slots)]
        t = torch.tensor(spans, dtype=torch.int64).t().contiguous()
        for s_ in structs:
            s_.num_groups, s_.starts, s_.lens, s_.slots = t.shape[1], t[0].data_ptr(), t[1].data_ptr(), t[2].data_ptr()
        calls = []
        for li, ly in enumerate(layers):
            for which, name in enumerate(PACKED):
                proj = rt.projections[li][name]
                fin, fout = proj.a.shape[1], proj.b.shape[2]
                qt, w, b = ly.fast_path.linears[3 * which:3 * which + 3]
                calls.append((which, fin, fout, qt, w, b, ctypes.byref(structs[li]), torch.randn(m, fin),
                              torch.zeros(m, fout)))

        def pass_(do_base: bool, do_lora: bool) -> None:
            for which, fin, fout, qt, w, b, stp, x, y in calls:
                if do_base:
                    lib.qlinear_any(qt, x.data_ptr(), m, fin, w, fout, b, y.data_ptr(), DIRECT_MAX_ROWS,
                                    fast.amx_min_rows)
                if do_lora:
                    lib.tm_lora_apply(stp, which, x.data_ptr(), 0, m, fin, y.data_ptr(), fout)

        reps = max(3, args.reps // 5)
        row = {"rows": m, "proj": "all layers", "base_ms": best_ms(lambda: pass_(True, False), reps),
               "lora_c_ms": best_ms(lambda: pass_(False, True), reps),
               "both_ms": best_ms(lambda: pass_(True, True), reps)}
        results["runs"].append(row)
        print(f"M={m:4d} {len(layers)} layers  base linears {row['base_ms']:7.2f} ms  LoRA terms "
              f"{row['lora_c_ms']:7.2f} ms"
              f"  interleaved {row['both_ms']:7.2f} ms  (+{row['both_ms'] - row['base_ms']:.2f} ms over base)",
              flush=True)
    engine.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
