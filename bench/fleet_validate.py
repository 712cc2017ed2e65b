"""The fleet simulator (tokenmill/perf/fleet.py) against a real 2-instance run on this machine.

1. calibrate the cost model for one instance's share of the machine (--num-threads 1: each data-parallel replica
   gets its own core), or --calibration FILE; 2. start `tokenmill serve --data-parallel-size 2` (two engine
   processes pinned to their own cores behind one API, --data-parallel-policy); 3. `bench serve` at each rate;
4. `simulate_fleet` of the same requests and arrivals over 2 colocated instances with the same routing policy;
5. print measured vs predicted TTFT / TPOT p50 and output tok/s.

  flock /work/bench.lock env PYTHONPATH=. python bench/fleet_validate.py --workload chat --rate 1,2 \\
      --num-requests 40 [--policy least-load] [--calibration cal.json] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from goodput_compare import default_tokenizer, serve_cmd  # noqa: E402
from goodput_validate import _pick, calibrate_default, reference_times  # noqa: E402

from tokenmill.bench.launch import server_process  # noqa: E402
from tokenmill.bench.serve import parse_rates, run_serve_benchmark  # noqa: E402
from tokenmill.perf.cli import CHAT_TEMPLATE_TOKENS  # noqa: E402
from tokenmill.perf.cost_model import CostModel  # noqa: E402
from tokenmill.perf.fleet import FleetSpec, simulate_fleet  # noqa: E402
from tokenmill.perf.simulator import SimConfig, requests_from_workload  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--rate", default="1,2")
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--policy", default="least-load", choices=["round-robin", "least-load", "prefix"])
    ap.add_argument("--calibration", default=None, help="a saved one-thread calibration instead of calibrating")
    ap.add_argument("--save-calibration", default="/tmp/tokenmill_cpu_calibration_1t.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tok = default_tokenizer()
    load0 = os.getloadavg()[0]
    cost = CostModel.load(args.calibration) if args.calibration else calibrate_default(args.save_calibration, 1)
    ref = reference_times(cost)
    print(f"one-thread cost model: decode step {ref['decode_ms']:.1f} ms, 512-token prefill "
          f"{ref['prefill_512_ms']:.0f} ms", flush=True)
    # no prefix caching: each rate resends the same seeded prompts (the simulator models no cache either)
    cmd = serve_cmd("fcfs", 10000, 1000, ["--no-enable-prefix-caching", "--data-parallel-size", "2",
                                          "--data-parallel-policy", args.policy])
    rates = parse_rates(args.rate)
    measured = []
    with server_process(cmd, log_path="/tmp/fleet_validate.log", env={"PYTHONPATH": str(ROOT)}) as base:
        for i, rate in enumerate(rates):
            measured.append(run_serve_benchmark(base, args.workload, [rate], num_requests=args.num_requests,
                                                seed=0, progress=False, tokenizer=tok, warmup=i == 0)[0])
    spec = FleetSpec(instances=2, router_policy=args.policy)
    rows = []
    for m in measured:
        reqs = requests_from_workload(args.workload, args.num_requests, m.rate, 0,
                                      chat_overhead=CHAT_TEMPLATE_TOKENS, tokenizer=tok)
        pred = _pick(simulate_fleet(reqs, cost, SimConfig(policy="fcfs"), spec, rate=m.rate).summary())
        rows.append({"rate": m.rate, "measured": _pick(m.summary), "predicted": pred})
    print(f"{'rate':>5} | {'TTFT p50 meas / pred':>21} | {'TPOT p50 meas / pred':>21} | {'out tok/s meas / pred':>22}")
    for r in rows:
        m, p = r["measured"], r["predicted"]
        print(f"{r['rate']:>5g} | {m['ttft_p50_ms']:>9.0f} / {p['ttft_p50_ms']:>9.0f} | {m['tpot_p50_ms']:>9.1f} / "
              f"{p['tpot_p50_ms']:>9.1f} | {m['output_tok_s']:>10.1f} / {p['output_tok_s']:>9.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"workload": args.workload, "num_requests": args.num_requests,
                                              "policy": args.policy, "loadavg_before": load0,
                                              "loadavg_after": os.getloadavg()[0], "cost_model": cost.to_dict(),
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
