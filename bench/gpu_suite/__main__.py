"""`python -m bench.gpu_suite STEP ...`: run one step of the GPU suite, or `report` (see bench/gpu_suite.sh)."""
from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from typing import Callable, Optional

STEPS = ("device", "gpu_tests", "hf_equal", "llama8b", "long32k", "fp8kv", "prefix", "hf_peer", "hf_8b", "moe_offload")
CUDA_ONLY = ("device", "gpu_tests")  # the others run tiny shapes on the CPU in a dry run


def _runner(name: str) -> Callable:
    from bench.gpu_suite import steps_basic, steps_engine, steps_hf, steps_moe

    return {"device": lambda ctx, step, sz, lim: steps_basic.run_device(ctx, step),
            "gpu_tests": lambda ctx, step, sz, lim: steps_basic.run_gpu_tests(ctx, step, lim),
            "hf_equal": lambda ctx, step, sz, lim: steps_hf.run_hf_equal(ctx, step, sz),
            "llama8b": lambda ctx, step, sz, lim: steps_engine.run_llama8b(ctx, step, sz),
            "long32k": lambda ctx, step, sz, lim: steps_engine.run_long32k(ctx, step, sz),
            "fp8kv": lambda ctx, step, sz, lim: steps_engine.run_fp8kv(ctx, step, sz),
            "prefix": lambda ctx, step, sz, lim: steps_engine.run_prefix(ctx, step, sz),
            "hf_peer": lambda ctx, step, sz, lim: steps_hf.run_hf_peer(ctx, step, sz),
            "hf_8b": lambda ctx, step, sz, lim: steps_hf.run_hf_8b(ctx, step, sz),
            "moe_offload": lambda ctx, step, sz, lim: steps_moe.run_moe_offload(ctx, step)}[name]


def run_step(name: str, work: str, dry: bool, t0: float, limit_s: float, seed: int = 0) -> int:
    from bench.gpu_suite.common import SKIPPED_NO_CUDA, Ctx, Step, StepTimeout, cuda_available
    from bench.gpu_suite.sizes import sizes_for

    ctx = Ctx(dry=dry, cuda=cuda_available(), work=work, t0=t0, seed=seed)
    if dry and not ctx.cuda:  # tiny models: one thread is faster, and steadier on a busy machine
        import torch

        torch.set_num_threads(1)
    step = Step(name, ctx)

    def _stop(signum, frame):  # the driver's `timeout` sends SIGTERM at the step's limit
        raise StepTimeout()

    signal.signal(signal.SIGTERM, _stop)
    try:
        if not ctx.cuda and not dry and name not in CUDA_ONLY:
            step.skip(SKIPPED_NO_CUDA)  # the full shapes are for a GPU; --dry-run runs tiny ones here
        else:
            _runner(name)(ctx, step, sizes_for(dry), limit_s)
    except StepTimeout:
        step.errors.append(f"stopped at the time limit ({limit_s:.0f} s)")
    except Exception as e:  # a bug outside the guarded measurements: record it, keep the suite going
        traceback.print_exc()
        step.errors.append(f"{type(e).__name__}: {e}"[:300])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        res = step.save()
    print(f"[gpu_suite] {name}: {res['status']}")
    return 0 if res["status"] == "ok" or res["status"].startswith("skipped") else 1


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__)
    ap.add_argument("step", choices=STEPS + ("report",))
    ap.add_argument("--work", required=True, help="folder of the steps' JSON")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--t0", type=float, default=None, help="epoch seconds the driver launched this step")
    ap.add_argument("--limit", type=float, default=120.0, help="the step's time limit in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="report: folder of gpu_suite.json and gpu_suite.md")
    ap.add_argument("--steps", default=",".join(STEPS), help="report: the steps, in order")
    ap.add_argument("--started", type=float, default=None, help="report: epoch seconds the suite started")
    ap.add_argument("--quiet", action="store_true", help="report: write the files, print nothing")
    a = ap.parse_args(argv)
    if a.step == "report":
        from bench.gpu_suite.report import write_report

        if not a.out:
            ap.error("report needs --out")
        return write_report(a.work, a.out, [s for s in a.steps.split(",") if s], a.dry_run, a.started, a.quiet)
    return run_step(a.step, a.work, a.dry_run, a.t0 if a.t0 is not None else time.time(), a.limit, a.seed)


if __name__ == "__main__":
    sys.exit(main())
