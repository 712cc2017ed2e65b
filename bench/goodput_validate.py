"""Predicted (calibrated cost model + simulator) vs measured (real `tokenmill serve` + `bench serve`).

1. calibrate the cost model on this machine (or --calibration FILE), 2. start the server (fcfs),
3. run `bench serve` at each rate, 4. simulate the same requests and arrivals, 5. print both.

--recalibrate-each-rate calibrates again right before each rate (a fresh server each time): on a shared VM whose
speed drifts by 10-20% within minutes, that separates the model's error from the machine's drift.

  PYTHONPATH=. python bench/goodput_validate.py --workload chat --rate 0.5,1,2 --num-requests 30 \
      --save-calibration cal.json --out validate.json [-- extra serve flags]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from goodput_compare import default_tokenizer, serve_cmd  # noqa: E402

from tokenmill.bench.launch import server_process  # noqa: E402
from tokenmill.bench.serve import parse_rates, run_serve_benchmark  # noqa: E402
from tokenmill.perf.cli import CHAT_TEMPLATE_TOKENS  # noqa: E402
from tokenmill.perf.cost_model import CostModel  # noqa: E402
from tokenmill.perf.simulator import SimConfig, requests_from_workload, simulate  # noqa: E402


def calibrate_default(path: str, num_threads=None) -> CostModel:
    from tokenmill.engine.llm import LLM
    from tokenmill.perf.cost_model import calibrate

    t0 = time.time()
    model = calibrate(LLM(num_threads=num_threads))
    model.info["calibration_s"] = time.time() - t0
    model.save(path)
    return model


def reference_times(cost: CostModel) -> dict:
    """The calibration's decode step (batch 1, 300-token context) and 512-token prefill, in ms."""
    return {"decode_ms": cost.predict(1, 1, 300, 300) * 1e3,
            "prefill_512_ms": cost.predict(512, 1, 512, 512 * 513 // 2) * 1e3,
            "median_fit_error": cost.info.get("median_rel_error")}


def drift_of_trace(trace: Path, t0: float, t1: float, cost: CostModel) -> Optional[float]:
    """The server's speed during [t0, t1] against the calibration: sum of measured step times over sum of
    predicted (time-weighted: what latencies see). None without steps in the window."""
    meas = pred = 0.0
    if trace.exists():
        for line in trace.read_text().splitlines():
            r = json.loads(line)
            if t0 <= r["t"] <= t1:
                meas += r["s"]
                pred += cost.predict(r["tokens"], r["reqs"], r["kv"], r["pairs"])
    return meas / pred if pred > 0 else None


def compare(workload: str, rates: list[float], num: int, cost: CostModel, extra: list[str],
            policy: str = "fcfs", slo_ttft=None, slo_tpot=None, seed: int = 0, tokenizer=None) -> list[dict]:
    """Measure each rate on one server (of `policy`) that writes a step trace, then simulate the same requests twice:
    with the calibration as it is ("predicted"), and with its step times scaled by the server's measured speed
    during that rate ("at run speed": the model's error with the machine's drift since calibration taken out)."""
    # no prefix caching: every rate resends the same seeded prompts, so later rates would hit the cache
    # (the simulator models no cache either)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "steps.jsonl"
        cmd = serve_cmd(policy, slo_ttft or 10000, slo_tpot or 1000,
                        ["--no-enable-prefix-caching", "--step-trace", str(trace), *extra])
        measured = []
        with server_process(cmd, log_path="/tmp/goodput_validate.log", env={"PYTHONPATH": str(ROOT)}) as base:
            for i, rate in enumerate(rates):
                t0 = time.time()
                m = run_serve_benchmark(base, workload, [rate], num_requests=num, slo_ttft_ms=slo_ttft,
                                        slo_tpot_ms=slo_tpot, seed=seed, progress=False, tokenizer=tokenizer,
                                        warmup=i == 0)[0]
                measured.append((m, drift_of_trace(trace, t0, time.time(), cost)))
    rows = []
    for m, drift in measured:
        reqs = requests_from_workload(workload, num, m.rate, seed, chat_overhead=CHAT_TEMPLATE_TOKENS,
                                      tokenizer=tokenizer)
        sims = {"predicted": 1.0, "predicted_at_run_speed": drift or 1.0}
        row = {"rate": m.rate, "measured": _pick(m.summary), "run_speed_vs_calibration": drift,
               "calibration": reference_times(cost)}
        for key, scale in sims.items():
            row[key] = _pick(simulate(reqs, cost, SimConfig(policy=policy), slo_ttft, slo_tpot, m.rate,
                                      step_scale=scale).summary())
        rows.append(row)
    return rows


def _pick(s: dict) -> dict:
    return {"ttft_p50_ms": s["ttft_ms"]["p50"], "tpot_p50_ms": s["tpot_ms"]["p50"],
            "output_tok_s": s["output_throughput"], "req_s": s["request_throughput"], "goodput": s["goodput"]}


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--rate", default="0.5,1,2")
    ap.add_argument("--num-requests", type=int, default=30)
    ap.add_argument("--calibration", default=None, help="use this saved calibration instead of calibrating")
    ap.add_argument("--save-calibration", default="/tmp/tokenmill_cpu_calibration.json")
    ap.add_argument("--out", default=None)
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads (calibration and server)")
    ap.add_argument("--recalibrate-each-rate", action="store_true",
                    help="calibrate again right before each rate (the machine's drift out of the comparison)")
    args = ap.parse_args(argv)
    if args.num_threads:
        extra = ["--num-threads", str(args.num_threads), *extra]
    load0 = os.getloadavg()[0]
    if args.recalibrate_each_rate and args.calibration:
        ap.error("--recalibrate-each-rate calibrates; drop --calibration")
    tok = default_tokenizer()

    def fresh() -> CostModel:
        cost = CostModel.load(args.calibration) if args.calibration else calibrate_default(args.save_calibration,
                                                                                          args.num_threads)
        ref = reference_times(cost)
        print(f"cost model: median fit error {cost.info.get('median_rel_error', float('nan')):.1%}; decode step "
              f"{ref['decode_ms']:.1f} ms, 512-token prefill {ref['prefill_512_ms']:.0f} ms", flush=True)
        return cost

    rates = parse_rates(args.rate)
    cost = fresh()
    rows = compare(args.workload, rates[:1] if args.recalibrate_each_rate else rates, args.num_requests, cost, extra,
                   tokenizer=tok)
    for rate in (rates[1:] if args.recalibrate_each_rate else []):
        cost = fresh()
        rows += compare(args.workload, [rate], args.num_requests, cost, extra, tokenizer=tok)
    print("pred: the calibration as it is; at speed: its step times x 'step x', the server's step times over "
          "the calibration's predictions during that rate (from the server's --step-trace)")
    print(f"{'rate':>5} | {'step x':>6} | {'TTFT p50 meas / pred / at speed':>31} | "
          f"{'TPOT p50 meas / pred / at speed':>31} | {'out tok/s meas / pred':>21}")
    for r in rows:
        m, p, q = r["measured"], r["predicted"], r["predicted_at_run_speed"]
        speed = r["run_speed_vs_calibration"]
        print(f"{r['rate']:>5g} | {speed or float('nan'):>6.2f} | {m['ttft_p50_ms']:>9.0f} / "
              f"{p['ttft_p50_ms']:>7.0f} / {q['ttft_p50_ms']:>7.0f} | {m['tpot_p50_ms']:>9.1f} / "
              f"{p['tpot_p50_ms']:>7.1f} / {q['tpot_p50_ms']:>7.1f} | {m['output_tok_s']:>9.1f} / "
              f"{p['output_tok_s']:>9.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"workload": args.workload, "num_requests": args.num_requests,
                                              "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
                                              "recalibrated_each_rate": args.recalibrate_each_rate,
                                              "cost_model": cost.to_dict(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
