"""Goodput of `--policy fcfs` vs `--policy slo` on the same server settings, workload and seed.

Pass `-- --no-enable-prefix-caching` when giving several rates: each rate resends the same seeded prompts.

Starts `tokenmill serve` once per policy (with the SLO targets as server-wide defaults,
--slo-ttft-ms / --slo-tpot-ms), runs `bench serve` at the given rate(s), stops it, and prints/writes the comparison.

  PYTHONPATH=. python bench/goodput_compare.py --workload long-prefill --rate 2 --num-requests 60 \
      --slo-ttft 1000 --slo-tpot 60 --out goodput.json [-- extra serve flags]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.bench.launch import server_process  # noqa: E402
from tokenmill.bench.serve import parse_rates, run_serve_benchmark  # noqa: E402


def default_tokenizer():
    """The default model's tokenizer (the client then sends prompts of exact token counts)."""
    from tokenmill.engine.tokenizer import load_tokenizer
    from tokenmill.model.loader import default_model_path

    return load_tokenizer(default_model_path())


def serve_cmd(policy: str, ttft: float, tpot: float, extra: list[str]) -> list[str]:
    """`tokenmill serve` with the policy and server-wide SLO targets ("{port}" filled in by server_process)."""
    return [sys.executable, "-m", "tokenmill.cli", "serve", "--policy", policy, "--slo-ttft-ms", str(ttft),
            "--slo-tpot-ms", str(tpot), "--port", "{port}", *extra]


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="long-prefill")
    p.add_argument("--rate", default="2")
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--slo-ttft", type=float, required=True)
    p.add_argument("--slo-tpot", type=float, required=True)
    p.add_argument("--policies", default="fcfs,slo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-calibration", default=None,
                   help="cost-model JSON (`tokenmill plan --calibrate --save-calibration F`) for the slo policy's "
                        "step-time predictions (default: it learns them online)")
    p.add_argument("--out", default=None)
    p.add_argument("--interleave", action="store_true",
                   help="a fresh server per (rate, policy), the policies alternating at each rate: drift of the "
                        "machine's speed during the sweep then hits both policies alike")
    args = p.parse_args(argv)
    rates = parse_rates(args.rate)
    # the default model's tokenizer: prompts of exactly the workload's token counts (as goodput_validate.py sends
    # them); with --model in the serve args the client estimates counts from words (0.75 a token)
    tokenizer = None if "--model" in extra else default_tokenizer()
    results: dict = {"exact_token_counts": tokenizer is not None, "workload": args.workload,
                     "slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot, "slo_calibration": args.slo_calibration,
                     "num_requests": args.num_requests, "seed": args.seed, "serve_args": extra, "runs": {}}
    policies = args.policies.split(",")

    def run(policy: str, rs: list[float]) -> None:
        own = ["--slo-calibration", args.slo_calibration] if (policy == "slo" and args.slo_calibration) else []
        cmd = serve_cmd(policy, args.slo_ttft, args.slo_tpot, [*own, *extra])
        with server_process(cmd, log_path=f"/tmp/goodput_server_{policy}.log", env={"PYTHONPATH": str(ROOT)}) as base:
            runs = run_serve_benchmark(base, args.workload, rs, num_requests=args.num_requests,
                                       slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot, seed=args.seed,
                                       progress=False, tokenizer=tokenizer)
        results["runs"].setdefault(policy, []).extend([{"rate": r.rate, **{k: r.summary[k] for k in (
            "goodput", "slo_attainment", "request_throughput", "output_throughput", "ttft_ms", "tpot_ms",
            "completed", "failed", "duration_s")}} for r in runs])
        for r in runs:
            s = r.summary
            print(f"{policy:>5} rate {r.rate:g}: goodput {s['goodput']:.3f} req/s, attainment "
                  f"{s['slo_attainment']:.2f}, TTFT p50 {s['ttft_ms']['p50']:.0f} ms, TPOT p50 "
                  f"{s['tpot_ms']['p50']:.1f} ms, p90 {s['tpot_ms']['p90']:.1f} ms, {s['output_throughput']:.1f} tok/s",
                  flush=True)

    results["interleaved"] = args.interleave
    if args.interleave:
        for rate in rates:
            for policy in policies:
                run(policy, [rate])
    else:
        for policy in policies:
            run(policy, rates)
    pols = list(results["runs"])
    results["distserve_goodput"] = {}
    for pol in pols:  # DistServe's goodput: the highest swept rate at which >= 90% of requests met both SLOs
        ok = [r["rate"] for r in results["runs"][pol] if r["slo_attainment"] >= 0.9]
        results["distserve_goodput"][pol] = max(ok) if ok else 0.0
        print(f"{pol:>5}: highest swept rate with >= 90% attainment: {results['distserve_goodput'][pol]:g} req/s")
    if len(pols) == 2:
        a, b = (results["runs"][x] for x in pols)
        for ra, rb in zip(a, b):
            ratio = rb["goodput"] / ra["goodput"] if ra["goodput"] else float("inf")
            print(f"rate {ra['rate']:g}: {pols[1]} / {pols[0]} goodput = {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
