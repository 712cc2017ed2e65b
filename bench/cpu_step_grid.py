"""Wall time of one engine step by shape: d running decodes plus a p-token prefill chunk (the chunk continues a
prompt whose first `--context` tokens are already cached), on the default model. Shows what mixed steps cost,
which is what an SLO-aware scheduler trades (and what `tokenmill plan --calibrate` fits); with
`--calibration FILE` the cost model's prediction is printed beside each measurement.

    PYTHONPATH=. python bench/cpu_step_grid.py [--decodes 0,4,8,16] [--chunks 0,8,16,32,48,64,96,128,192,256]
        [--context 300] [--repeats 3] [--calibration bench/results/s5/cpu_calibration.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.llm import LLM
from tokenmill.perf.cost_model import CostModel, shape_of_schedule
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def _ids(n: int, seed: int) -> list[int]:
    return [(1000 + 7919 * seed + 13 * i) % 48990 + 5 for i in range(n)]


def _run(sched: Scheduler, runner) -> object:
    out = sched.schedule()
    sched.update_from_output(out, runner.execute_model(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", default="0,4,8,16")
    ap.add_argument("--chunks", default="0,8,16,32,48,64,96,128,192,256")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration", default=None)
    args = ap.parse_args()
    llm = LLM(enable_prefix_caching=False)
    core = llm.engine.core
    runner, cfg, block = core.runner, core.config.scheduler, core.config.cache.block_size
    cost = CostModel.load(args.calibration) if args.calibration else None
    print(f"{'decodes':>7} {'chunk':>6} {'tokens':>6} {'ms':>8}" + (f" {'pred ms':>8}" if cost else ""))
    for d in (int(x) for x in args.decodes.split(",")):
        for p in (int(x) for x in args.chunks.split(",")):
            if d == 0 and p == 0:
                continue
            times, shape = [], None
            for rep in range(args.repeats):
                sched = Scheduler(cfg, runner.num_blocks, block, runner.max_model_len, enable_prefix_caching=False)
                for b in range(d):
                    sched.add_request(Request(f"d{b}", _ids(200, b + 50 * rep), SamplingParams(
                        temperature=0.0, max_tokens=50, ignore_eos=True), (), time.monotonic(), 50))
                while any(r.num_computed_tokens < r.num_tokens - 1 for r in sched.running + sched.waiting):
                    _run(sched, runner)  # the decodes' prompts
                if p:
                    sched.add_request(Request("p", _ids(args.context + p, 999 + rep), SamplingParams(
                        temperature=0.0, max_tokens=4, ignore_eos=True), (), time.monotonic(), 4))
                    if args.context:  # the cached part of the prompt, in a step of its own
                        sched.config = dataclasses.replace(cfg, max_num_batched_tokens=d + args.context)
                        _run(sched, runner)
                        sched.config = cfg
                t0 = time.perf_counter()
                shape = shape_of_schedule(_run(sched, runner))
                times.append(time.perf_counter() - t0)
                sched.abort_requests(list(sched.requests))
                _run(sched, runner)
            ms = statistics.median(times) * 1e3
            line = f"{d:>7} {p:>6} {shape.num_tokens:>6} {ms:>8.1f}"
            if cost:
                pred = cost.predict(shape.num_tokens, shape.num_reqs, shape.kv_tokens_read, shape.attn_pairs) * 1e3
                line += f" {pred:>8.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
