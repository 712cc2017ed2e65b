"""What the HTTP layer adds to TPOT: the same load through `tokenmill serve` + the benchmark client and
through the offline engine in-process.

Load: N concurrent streaming requests (default 32) of a fixed prompt/output size, all arriving at once.
Offline TPOT per request = (time of last token - time of first token) / (tokens - 1), taken in the step
loop; HTTP TPOT is the same quantity as the client sees it.

    PYTHONPATH=. python bench/http_overhead.py [--concurrency 32] [--in-len 200 --out-len 64] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from tokenmill.bench.launch import server_process
from tokenmill.bench.serve import run_serve_benchmark
from tokenmill.bench.workloads import get_workload
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import SamplingParams


def offline_tpot(args) -> tuple[float, float]:
    eng = LLMEngine.from_config(EngineConfig.from_kwargs(dtype=args.dtype, num_threads=args.threads,
                                                        max_num_seqs=max(args.concurrency, 1)))
    wl = get_workload(f"fixed:{args.in_len}:{args.out_len}", tokenizer=eng.tokenizer, seed=args.seed)
    convs = wl.generate(args.concurrency, args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.out_len, ignore_eos=True)
    first, last = {}, {}
    t0 = time.perf_counter()
    for i, c in enumerate(convs):
        ids = eng.processor.apply_chat_template([{"role": "user", "content": c.turns[0].prompt}])
        eng.add_request(str(i), None, params, prompt_token_ids=ids)
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.outputs[0].token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
    wall = time.perf_counter() - t0
    tpots = [(last[k] - first[k]) / (args.out_len - 1) for k in first]
    return statistics.median(tpots) * 1000, wall


def http_tpot(args) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", "{port}", "--dtype", args.dtype,
           "--num-threads", str(args.threads), "--max-num-seqs", str(max(args.concurrency, 1))]
    with server_process(cmd) as base:
        t0 = time.perf_counter()
        res = run_serve_benchmark(base, f"fixed:{args.in_len}:{args.out_len}", [1e6],
                                  num_requests=args.concurrency, seed=args.seed, progress=False, warmup=True)
        return res[0].summary["tpot_ms"]["p50"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--in-len", type=int, default=200)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    off, off_wall = offline_tpot(args)
    http, http_wall = http_tpot(args)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
           "offline_tpot_p50_ms": off, "http_tpot_p50_ms": http, "overhead_pct": 100 * (http - off) / off,
           "offline_wall_s": off_wall, "http_wall_s": http_wall, "load_avg": os.getloadavg()}
    print(f"{'path':<10}{'TPOT p50 ms':>14}{'wall s':>10}")
    print(f"{'offline':<10}{off:>14.1f}{off_wall:>10.1f}")
    print(f"{'http':<10}{http:>14.1f}{http_wall:>10.1f}")
    print(f"HTTP adds {res['overhead_pct']:+.1f}% to TPOT at {args.concurrency} concurrent streams")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
