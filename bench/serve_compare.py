"""Serving benchmark: tokenmill vs llama.cpp's llama-server, same model, same load, one run.

Both servers get the same Poisson arrivals of the same requests through `tokenmill bench serve`'s client
(streaming chat completions), one server at a time (2 cores: never both at once), with the same number
of parallel slots (llama-server -np N; tokenmill --max-num-seqs N) and 2 threads each.

    PYTHONPATH=. python bench/serve_compare.py --rates 0.25,0.5,1 --num-requests 24 --slots 16 \
        [--llama-server /tmp/peers/lcpp-build/bin/llama-server] [--workload chat] [--out results.json]
llama-server is built by ../shared/bench/cpu_peers/setup.sh; without it only tokenmill is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tokenmill.bench.launch import server_process
from tokenmill.bench.serve import run_serve_benchmark
from tokenmill.model.loader import default_model_path


def _servers(args) -> dict[str, list[str]]:
    out = {"tokenmill": [sys.executable, "-m", "tokenmill.cli", "serve", "--dtype", args.dtype,
                         "--num-threads", "2", "--max-num-seqs", str(args.slots), "--port", "{port}"]}
    if args.llama_server and os.path.exists(args.llama_server):
        ctx = max(1024, args.slots * args.ctx_per_slot)
        out["llama-server"] = [args.llama_server, "-m", default_model_path(), "-t", "2", "-tb", "2",
                               "-np", str(args.slots), "-c", str(ctx), "--port", "{port}", "--host", "127.0.0.1"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.25,0.5,1")
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--workload", default="chat:in_median=200,out_median=128,out_max=256")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--ctx-per-slot", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--llama-server", default="/tmp/peers/lcpp-build/bin/llama-server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args), "engines": {}}
    for name, cmd in _servers(args).items():
        with server_process(cmd, env={"OMP_NUM_THREADS": "2"}) as base:
            res = run_serve_benchmark(base, args.workload, rates, num_requests=args.num_requests, seed=args.seed,
                                      progress=False)
            results["engines"][name] = {str(r.rate): r.summary for r in res}
    hdr = f"{'engine':<14}{'rate':>6}{'TTFT p50':>10}{'p90':>8}{'p99':>8}{'TPOT p50':>10}{'p90':>8}{'e2e p50':>9}" \
          f"{'out tok/s':>10}"
    print(hdr)
    for name, by_rate in results["engines"].items():
        for rate, s in by_rate.items():
            t, p, e = s["ttft_ms"], s["tpot_ms"], s["e2e_ms"]
            print(f"{name:<14}{float(rate):>6.2f}{t['p50']:>10.0f}{t['p90']:>8.0f}{t['p99']:>8.0f}{p['p50']:>10.1f}"
                  f"{p['p90']:>8.1f}{e['p50']:>9.0f}{s['output_throughput']:>10.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
