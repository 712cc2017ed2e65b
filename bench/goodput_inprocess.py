"""fcfs vs slo goodput on the real engine, in-process, in real time (no HTTP layer).

The same seeded workload and Poisson arrivals as `bench serve`; each request is added to the engine at
its arrival time and the engine is stepped as fast as it goes; TTFT / TPOT are taken in the step loop.
Separates the scheduling policy's effect from the serving layer's (compare with bench/goodput_compare.py).

  PYTHONPATH=. python bench/goodput_inprocess.py --workload "chat:out_median=48,ignore_eos=1" --rate 1 \
      --num-requests 50 --slo-ttft 2000 --slo-tpot 150 [--policies fcfs,slo] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.engine.llm import LLM  # noqa: E402
from tokenmill.perf.cli import CHAT_TEMPLATE_TOKENS  # noqa: E402
from tokenmill.perf.simulator import requests_from_workload  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402


def traced(eng, trace: list) -> None:
    """Record every step: its shape, the forward's wall time and the whole engine step's (set in the loop)."""
    from tokenmill.perf.cost_model import shape_of_schedule

    runner = eng.core.runner
    inner = runner.execute_model
    policy = eng.core.scheduler.policy
    model = policy.step_model() if hasattr(policy, "step_model") else None  # the slo policy's step-time model

    def execute_model(sched):
        t0 = time.perf_counter()
        out = inner(sched)
        sh = shape_of_schedule(sched)
        trace.append({"t": t0, "tokens": sh.num_tokens, "reqs": sh.num_reqs, "kv": sh.kv_tokens_read,
                      "pairs": sh.attn_pairs, "forward_s": time.perf_counter() - t0,
                      "pred_s": model.predict(sh.num_tokens, sh.num_reqs, sh.kv_tokens_read, sh.attn_pairs)
                      if model is not None else None})
        return out

    runner.execute_model = execute_model


def run_policy(policy: str, workload: str, rate: float, num: int, ttft_ms: float, tpot_ms: float,
               seed: int, trace: list | None = None, calibration: str | None = None) -> dict:
    cal = {"slo_calibration": calibration} if (calibration and policy == "slo") else {}
    llm = LLM(policy=policy, slo_ttft_ms=ttft_ms, slo_tpot_ms=tpot_ms, enable_prefix_caching=False, **cal)
    eng = llm.engine
    if trace is not None:
        traced(eng, trace)
    reqs = requests_from_workload(workload, num, rate, seed=seed, chat_overhead=CHAT_TEMPLATE_TOKENS)
    vocab = int(eng.core.runner.hf_config.vocab_size)
    rng = random.Random(seed)
    t0 = time.monotonic()
    pending = list(enumerate(reqs))
    first: dict[str, float] = {}
    arrive: dict[str, float] = {}
    done: dict[str, tuple[float, float]] = {}
    end = t0
    while pending or eng.has_unfinished_requests():
        now = time.monotonic()
        while pending and t0 + pending[0][1].arrival_s <= now:
            i, r = pending.pop(0)
            ids = [rng.randrange(1000, vocab - 1000) for _ in range(r.prompt_len)]
            eng.add_request(f"r{i}", None, SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0),
                            prompt_token_ids=ids, arrival_time=t0 + r.arrival_s)
            arrive[f"r{i}"] = t0 + r.arrival_s
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, t0 + pending[0][1].arrival_s - time.monotonic()))
            continue
        n_before = len(trace) if trace is not None else 0
        t_step = time.perf_counter()
        outs = eng.step()
        if trace is not None and len(trace) > n_before:
            trace[-1]["step_s"] = time.perf_counter() - t_step
        for out in outs:
            t = time.monotonic()
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = t
            if out.finished and out.request_id in first:
                n = len(out.outputs[0].token_ids)
                done[out.request_id] = (first[out.request_id] - arrive[out.request_id],
                                        (t - first[out.request_id]) / max(1, n - 1))
                end = t
    good = sum(1 for a, b in done.values() if a * 1e3 <= ttft_ms and b * 1e3 <= tpot_ms)
    dur = max(end - t0, 1e-9)

    def pct(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3

    ttfts = [a for a, _ in done.values()]
    tpots = [b for _, b in done.values()]
    return {"policy": policy, "completed": len(done), "attainment": good / max(1, len(done)),
            "goodput": good / dur, "ttft_ms": {"p50": pct(ttfts, 50), "p90": pct(ttfts, 90)},
            "tpot_ms": {"p50": pct(tpots, 50), "p90": pct(tpots, 90)}, "duration_s": dur}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="chat:out_median=48,ignore_eos=1")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--num-requests", type=int, default=50)
    ap.add_argument("--slo-ttft", type=float, required=True)
    ap.add_argument("--slo-tpot", type=float, required=True)
    ap.add_argument("--policies", default="fcfs,slo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--slo-calibration", default=None, help="cost-model JSON for the slo policy (as `serve`)")
    ap.add_argument("--trace", default=None, help="write every step's shape and wall times (JSON) here")
    args = ap.parse_args(argv)
    rows = []
    traces = {}
    for pol in args.policies.split(","):
        trace = [] if args.trace else None
        r = run_policy(pol, args.workload, args.rate, args.num_requests, args.slo_ttft, args.slo_tpot, args.seed,
                       trace, args.slo_calibration)
        if trace is not None:
            traces[pol] = trace
        rows.append(r)
        print(f"{pol:>5}: goodput {r['goodput']:.3f} req/s, attainment {r['attainment']:.2f}, TTFT p50/p90 "
              f"{r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p90']:.0f} ms, TPOT p50/p90 {r['tpot_ms']['p50']:.0f}/"
              f"{r['tpot_ms']['p90']:.0f} ms", flush=True)
    if len(rows) == 2 and rows[0]["goodput"]:
        print(f"{rows[1]['policy']} / {rows[0]['policy']} goodput = {rows[1]['goodput'] / rows[0]['goodput']:.2f}x")
    if args.trace:
        Path(args.trace).write_text(json.dumps(traces))
    if args.out:
        Path(args.out).write_text(json.dumps({"workload": args.workload, "rate": args.rate, "slo_ttft_ms": args.slo_ttft,
                                              "slo_tpot_ms": args.slo_tpot, "num_requests": args.num_requests,
                                              "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
