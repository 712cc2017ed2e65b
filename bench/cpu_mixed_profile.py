"""The served fixed:IN:OUT workload at a concurrency, in process (no HTTP): `--requests` prompts of `--prompt`
tokens, `--output` greedy tokens each, at most `--concurrency` running, scheduled by the real scheduler (chunked
prefill mixes prompt chunks into decode steps, as the server does). Prints generated tok/s, the step time split
into decode-only and mixed steps, a least-squares fit step_ms = a + b * decodes + c * prompt_tokens, and
optionally the torch profiler's top ops over the whole run.

    PYTHONPATH=. python bench/cpu_mixed_profile.py [--concurrency 64] [--requests 128] [--prompt 200]
        [--output 96] [--model PATH] [--dtype auto] [--gemm-dtype auto] [--threads 2] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cpu_decode_profile import _ids  # the same synthetic prompts (bench/ is on the path when run as a script)
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.llm import LLM
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def run(sched: Scheduler, runner, args) -> list[tuple[int, int, float]]:
    """-> per step (decode rows, prompt tokens, seconds), all requests run to completion."""
    pending = [Request(f"r{i}", _ids(args.prompt, i), SamplingParams(temperature=0.0, max_tokens=args.output,
                                                                    ignore_eos=True), (), time.monotonic(), args.output)
               for i in range(args.requests)]
    steps = []
    done = 0
    while done < args.requests:
        while pending and len(sched.running) + len(sched.waiting) < args.concurrency:
            sched.add_request(pending.pop(0))
        t0 = time.perf_counter()
        out = sched.schedule()
        res = runner.execute_model(out)
        fin = sched.update_from_output(out, res)
        dt = time.perf_counter() - t0
        dec = sum(1 for rid, n in out.num_scheduled_tokens.items() if n == 1)
        pre = sum(n for n in out.num_scheduled_tokens.values() if n > 1)
        steps.append((dec, pre, dt))
        done += sum(1 for o in fin if o.finish_reason is not None)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--output", type=int, default=96)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gemm-dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    kw = {"model": args.model} if args.model else {}
    llm = LLM(enable_prefix_caching=False, num_threads=args.threads, gemm_dtype=args.gemm_dtype, dtype=args.dtype,
              max_num_seqs=args.concurrency, **kw)
    core = llm.engine.core
    runner, cfg, block = core.runner, core.config.scheduler, core.config.cache.block_size
    sched = Scheduler(cfg, runner.num_blocks, block, runner.max_model_len, enable_prefix_caching=False)
    warm = argparse.Namespace(**{**vars(args), "requests": min(8, args.requests), "output": 4})
    run(sched, runner, warm)
    t0 = time.perf_counter()
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps = run(sched, runner, args)
    else:
        steps = run(sched, runner, args)
    wall = time.perf_counter() - t0
    gen = args.requests * args.output
    dec_only = [s[2] * 1e3 for s in steps if s[1] == 0]
    mixed = [s[2] * 1e3 for s in steps if s[1] > 0]
    print(f"{args.requests} requests, {args.prompt} -> {args.output} tokens, concurrency {args.concurrency}: "
          f"{wall:.1f} s, {gen / wall:.1f} generated tok/s, {len(steps)} steps "
          f"({len(dec_only)} decode-only p50 {statistics.median(dec_only) if dec_only else 0:.1f} ms, "
          f"{len(mixed)} mixed p50 {statistics.median(mixed) if mixed else 0:.1f} ms), "
          f"prompt tokens per step {sum(s[1] for s in steps) / len(steps):.1f}")
    a = torch.tensor([[1.0, s[0], s[1]] for s in steps], dtype=torch.float64)
    y = torch.tensor([s[2] * 1e3 for s in steps], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1).tolist()
    print(f"fit: step_ms = {coef[0]:.1f} + {coef[1]:.3f} * decodes + {coef[2]:.3f} * prompt_tokens "
          f"(prompt tokens {1e3 / max(coef[2], 1e-9):.0f}/s at the margin)")
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
