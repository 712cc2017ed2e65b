"""Where a decode step's time goes at high concurrency, in process, on the default model: `d` running requests
(prompts of `--context` tokens, already prefilled), then `--steps` decode steps timed whole and split by the
torch profiler (model ops, sampler, the rest), with the Python-side split from cProfile.

    PYTHONPATH=. python bench/cpu_decode_profile.py [--decodes 16,64] [--context 200] [--steps 20] [--top 25]
        [--gemm-dtype auto] [--threads 2]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.llm import LLM
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def _ids(n: int, seed: int) -> list[int]:
    return [(1000 + 7919 * seed + 13 * i) % 48990 + 5 for i in range(n)]


def _fill(sched: Scheduler, runner, d: int, context: int, max_tokens: int, temperature: float, top_p: float) -> None:
    for b in range(d):
        sched.add_request(Request(f"d{b}", _ids(context, b), SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_tokens, ignore_eos=True), (), time.monotonic(), max_tokens))
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in sched.running + sched.waiting):
        out = sched.schedule()
        sched.update_from_output(out, runner.execute_model(out))


def _steps(sched: Scheduler, runner, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = sched.schedule()
        sched.update_from_output(out, runner.execute_model(out))
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", default="16,64")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gemm-dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--no-profile", action="store_true", help="step times only")
    args = ap.parse_args()
    kw = {"model": args.model} if args.model else {}
    llm = LLM(enable_prefix_caching=False, num_threads=args.threads, gemm_dtype=args.gemm_dtype, dtype=args.dtype,
              kv_cache_dtype=args.kv_cache_dtype,
              max_num_seqs=max(int(x) for x in args.decodes.split(",")), **kw)
    core = llm.engine.core
    runner, cfg, block = core.runner, core.config.scheduler, core.config.cache.block_size
    for d in (int(x) for x in args.decodes.split(",")):
        sched = Scheduler(cfg, runner.num_blocks, block, runner.max_model_len, enable_prefix_caching=False)
        _fill(sched, runner, d, args.context, 3 * args.steps + 10, args.temperature, args.top_p)
        _steps(sched, runner, 3)  # warm-up
        wall = _steps(sched, runner, args.steps)
        ms = statistics.median(wall) * 1e3
        print(f"\n=== {d} decodes at ~{args.context} context: step p50 {ms:.1f} ms -> {d / ms * 1e3:.0f} tok/s")
        if args.no_profile:
            sched.abort_requests(list(sched.requests))
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _steps(sched, runner, args.steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        pr = cProfile.Profile()
        pr.enable()
        _steps(sched, runner, args.steps)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(args.top)
        print(s.getvalue())
        sched.abort_requests(list(sched.requests))


if __name__ == "__main__":
    main()
