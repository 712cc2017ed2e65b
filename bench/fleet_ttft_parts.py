"""Each request's TTFT in parts, measured (step traces) against simulated, for a `bench/fleet_validate.py --mode
disagg` result and the step traces of its run (--trace-dir).

Measured, per request (send order = FCFS order of the producer's prefill steps; the client's send times aligned to
the trace by the first prefill step, which starts ingress_s after the first send): queue (send to its prefill step's
start, less ingress_s), step (that prefill step), after (its end to the client's first token: the hop to the
consumer, the consumer's step in progress, the way back). Simulated: the same parts from simulate_fleet(parts=)
with the served calibration's cost models, with the idle hop (hop_s only) and with the first-token path fitted
under load and the traced time between steps (when the result has them).

  python bench/fleet_ttft_parts.py --result bench/results/s20/fleet_validate_disagg_run1.json \
      --trace-dir bench/results/s20/traces_run1 [--repredict]
"""
from __future__ import annotations

import argparse
import calendar
import gzip
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from tokenmill.perf.cost_model import CostModel  # noqa: E402
from tokenmill.perf.fleet import FleetSpec, simulate_fleet  # noqa: E402
from tokenmill.perf.served_path import (FirstTokenPath, assign_fcfs, spread_of_trace,  # noqa: E402
                                        step_gap_of_trace)
from tokenmill.perf.simulator import SimConfig, SimRequest  # noqa: E402
from tokenmill.perf.step_trace import read_step_trace_timed  # noqa: E402

CHAT_TEMPLATE_TOKENS = 30  # tokenmill/perf/cli.py's, without importing the CLI


def measured_parts(row: dict, prefill_rows: list[dict], ingress_s: float) -> list[dict[str, float]]:
    reqs = row["measured_requests"]  # [prompt, output, TTFT s, TPOT s, sent at s], send order
    steps = [r for r in prefill_rows if row["t0"] <= r["t"] <= row["t1"] and r["tokens"] > r["reqs"]]
    if sum(r["reqs"] for r in steps) == len(reqs) + 1:  # the first rate's warm-up request
        steps = steps[1:]
    which = assign_fcfs([r["reqs"] for r in steps], len(reqs))
    offset = steps[0]["t"] - ingress_s - reqs[0][4]
    out = []
    for (_, _, ttft, _, sent), k in zip(reqs, which):
        st = steps[k]
        send = offset + sent
        out.append({"queue_s": st["t"] - send - ingress_s, "step_s": st["s"], "after_s": send + ttft - st["t"] - st["s"],
                    "ttft_s": ttft})
    return out


def simulated_parts(row: dict, result: dict, spec: FleetSpec) -> list[dict[str, float]]:
    sc = result["served_calibration"]
    reqs = [SimRequest(p + CHAT_TEMPLATE_TOKENS, n, sent) for p, n, _, _, sent in row["measured_requests"]]
    parts: dict[int, dict[str, float]] = {}
    res = simulate_fleet(reqs, CostModel.from_dict(sc["prefill_cost_model"]), SimConfig(policy="fcfs"), spec,
                         rate=row["rate"], decode_cost=CostModel.from_dict(sc["decode_cost_model"]), parts=parts)
    return [{**parts[i], "ttft_s": rec[2]} for i, rec in enumerate(res.records)]


def summary(parts: list[dict[str, float]]) -> str:
    med = {k: statistics.median(p[k] for p in parts) * 1e3 for k in ("queue_s", "step_s", "after_s", "ttft_s")}
    mean = {k: statistics.fmean(p[k] for p in parts) * 1e3 for k in ("queue_s", "step_s", "after_s", "ttft_s")}
    return " | ".join(f"{k[:-2]} {med[k]:6.0f} / {mean[k]:6.0f}" for k in med)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", required=True, help="a fleet_validate.py --mode disagg JSON")
    ap.add_argument("--trace-dir", required=True, help="its --trace-dir (prefill.jsonl or prefill.jsonl.gz)")
    ap.add_argument("--repredict", action="store_true",
                    help="also fleet_validate's served prediction at the current code (see repredict())")
    ap.add_argument("--replicates", type=int, default=40)
    args = ap.parse_args(argv)
    result = json.loads(Path(args.result).read_text())
    trace = Path(args.trace_dir) / "prefill.jsonl"
    text = trace.read_text() if trace.exists() else gzip.decompress(trace.with_suffix(".jsonl.gz").read_bytes()).decode()
    rows = [json.loads(line) for line in text.splitlines() if line]
    sp = result["spec"]
    idle = FleetSpec(2, 1, result["policy"], sp["transfer_s_per_block"], sp["transfer_s_per_pull"], sp["hop_s"],
                     sp["ingress_s"])
    sc = result["served_calibration"]
    path = sc.get("path")
    specs = [("simulated, idle hop", idle)]
    if path:
        specs.append(("simulated, path under load", replace(
            idle, hop_s=path["hop_s"], return_s=path["return_s"], hop_s_per_request=path["hop_s_per_request"],
            step_gap_s=sc.get("prefill_step_gap_s", 0.0), decode_step_gap_s=sc.get("decode_step_gap_s", 0.0))))
    print("ms, median / mean over the rate's requests")
    for row in result["rows"]:
        print(f"rate {row['rate']:g}")
        print(f"  {'measured':28s} {summary(measured_parts(row, rows, sp['ingress_s']))}")
        for label, spec in specs:
            print(f"  {label:28s} {summary(simulated_parts(row, result, spec))}")
    if args.repredict:
        repredict(result, Path(args.trace_dir), idle, args.replicates)
    return 0


def _trace(path: Path) -> Path:
    return path if path.exists() else path.with_suffix(".jsonl.gz")


def calibration_window(result: dict) -> tuple[float, float]:
    """The served calibration pass's wall-clock span (its start / end UTC times on the first rate's day)."""
    t0 = result["rows"][0]["t0"]
    day = time.strftime("%Y-%m-%d", time.gmtime(t0))
    sc = result["served_calibration"]
    a, b = (calendar.timegm(time.strptime(f"{day} {sc[k]}", "%Y-%m-%d %H:%M:%S")) for k in ("start_utc", "end_utc"))
    return float(a), float(b) + 1.0


def repredict(result: dict, trace_dir: Path, idle: FleetSpec, replicates: int) -> None:
    """fleet_validate's served prediction at the current code from a saved result: its served cost models and
    first-token path, the time between steps and the step scatter from the calibration pass's traces."""
    from fleet_validate import served_prediction

    a, b = calibration_window(result)
    sc = result["served_calibration"]
    served = {"prefill": CostModel.from_dict(sc["prefill_cost_model"]),
              "decode": CostModel.from_dict(sc["decode_cost_model"]),
              "path": FirstTokenPath(**sc["path"]) if sc.get("path") else None}
    for side in ("prefill", "decode"):
        timed = read_step_trace_timed(_trace(trace_dir / f"{side}.jsonl"), a, b)
        served[f"{side}_spread"] = spread_of_trace(served[side], [(sh, t) for _, sh, t in timed], [t for t, _, _ in timed])
        served[f"{side}_step_gap_s"] = step_gap_of_trace([(t, s) for t, _, s in timed])
    print(f"re-predicted at the current code (calibration pass {sc['start_utc']}-{sc['end_utc']} UTC: between steps "
          f"{served['prefill_step_gap_s'] * 1e3:.2f} / {served['decode_step_gap_s'] * 1e3:.2f} ms)")
    for row in result["rows"]:
        reqs = [SimRequest(p + CHAT_TEMPLATE_TOKENS, n, sent) for p, n, _, _, sent in row["measured_requests"]]
        meas = row["measured"]
        err = {k: 0.0 for k in ("ttft_p50_ms", "tpot_p50_ms", "output_tok_s") if meas[k]}
        out = served_prediction(reqs, meas, err, idle, served, row["rate"], replicates)
        band = out["predicted_served_replicates"]
        print(f"rate {row['rate']:g}: " + ", ".join(
            f"{k} {meas[k]:.1f} / {out['predicted_served_calibration'][k]:.1f} "
            f"({out['error_served_calibration'][k]:+.0%}; runs {band[k]['median']:.1f}, {band[k]['p10']:.1f}-"
            f"{band[k]['p90']:.1f})" for k in err))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
