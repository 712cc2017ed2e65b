"""The engine core in its own process vs on a thread of the server vs the offline engine, at 32 and 64
concurrent streams: TPOT p50 and TTFT p50 as `tokenmill bench serve` sees them through HTTP, and the same
quantities taken in the offline engine's step loop (bench/http_overhead.py's method).

Load per point: N streaming requests of a fixed prompt/output size (chat template), all arriving at once;
the server runs the CPU default model (SmolLM2-135M GGUF) with --num-threads.

    PYTHONPATH=. python bench/engine_process.py [--concurrency 32,64] [--in-len 200 --out-len 64] \
        [--threads 2] [--out bench/results/engine_process.json]
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


def offline(args, n: int) -> dict:
    eng = LLMEngine.from_config(EngineConfig.from_kwargs(dtype=args.dtype, num_threads=args.threads,
                                                        max_num_seqs=n))
    wl = get_workload(f"fixed:{args.in_len}:{args.out_len}", tokenizer=eng.tokenizer, seed=args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.out_len, ignore_eos=True)
    result = {}
    convs = wl.generate(n, args.seed)
    # warm-up as `tokenmill bench serve` does it: one short request of the first prompt (so the prefix cache
    # holds that one prompt, as on the server)
    for rep, batch, p in (("warmup", convs[:1], SamplingParams(temperature=0, max_tokens=8)), ("run", convs, params)):
        first, last = {}, {}
        t0 = time.perf_counter()
        for i, c in enumerate(batch):
            ids = eng.processor.apply_chat_template([{"role": "user", "content": c.turns[0].prompt}])
            eng.add_request(f"{rep}{i}", None, p, prompt_token_ids=ids)
        while eng.has_unfinished_requests():
            outs = eng.step()
            now = time.perf_counter()
            for o in outs:
                if o.outputs[0].token_ids:
                    first.setdefault(o.request_id, now)
                    last[o.request_id] = now
        result = {"tpot_p50_ms": 1000 * statistics.median((last[k] - first[k]) / (args.out_len - 1) for k in first),
                  "ttft_p50_ms": 1000 * statistics.median(first[k] - t0 for k in first),
                  "wall_s": time.perf_counter() - t0}
    return result


def http(args, n: int, engine_process: bool) -> dict:
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", "{port}", "--dtype", args.dtype,
           "--num-threads", str(args.threads), "--max-num-seqs", str(n),
           "--engine-process" if engine_process else "--no-engine-process"]
    with server_process(cmd) as base:
        t0 = time.perf_counter()
        res = run_serve_benchmark(base, f"fixed:{args.in_len}:{args.out_len}", [1e6], num_requests=n,
                                  seed=args.seed, progress=False, warmup=True)
        s = res[0].summary
        return {"tpot_p50_ms": s["tpot_ms"]["p50"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="32,64")
    ap.add_argument("--in-len", type=int, default=200)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    print(f"{'streams':>8} {'path':<18}{'TPOT p50 ms':>13}{'TTFT p50 ms':>13}{'TPOT vs offline':>17}")
    for n in (int(x) for x in args.concurrency.split(",")):
        off = offline(args, n)
        points = {"offline": off, "http engine process": http(args, n, True),
                  "http in-process": http(args, n, False)}
        for path, r in points.items():
            r["tpot_vs_offline_pct"] = 100 * (r["tpot_p50_ms"] - off["tpot_p50_ms"]) / off["tpot_p50_ms"]
            rows.append({"streams": n, "path": path, **r})
            print(f"{n:>8} {path:<18}{r['tpot_p50_ms']:>13.1f}{r['ttft_p50_ms']:>13.0f}"
                  f"{r['tpot_vs_offline_pct']:>+16.1f}%", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
                       "load_avg_after": os.getloadavg(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
