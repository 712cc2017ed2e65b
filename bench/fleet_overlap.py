"""Do the producer and the consumer of a disaggregated pair on one box slow each other down? Offline, from the step
traces and result JSON of bench/fleet_validate.py --mode disagg (--trace-dir, --out).

For every calibration pass and measured rate of a run, each side's steps: their speed against the first pass's
served fit (measured / predicted, time-weighted), the time-weighted fraction of their wall time during which the
other side was stepping (co-busy: tokenmill/perf/step_trace.py co_busy_fractions), the co-busy factor (the
slope of log(measured / fit) over that fraction, as a factor: a step run entirely co-busy over one run alone),
and the producer's mean step size; then over the whole run each side's steps binned by co-busy fraction, and the
share of the measured rate's extra producer time (against the passes) left after the co-busy line is taken out.

  python bench/fleet_overlap.py bench/results/s21/fleetcal_disagg_run1.json bench/results/s21/fleetcal_traces_run1
"""
from __future__ import annotations

import argparse
import math
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.perf.cost_model import CostModel  # noqa: E402
from tokenmill.perf.step_trace import co_busy_factor, co_busy_fractions, read_step_trace_timed  # noqa: E402

SIDES = (("prefill", "decode"), ("decode", "prefill"))
BINS = ((0.0, 0.25), (0.25, 0.75), (0.75, 0.95), (0.95, 1.01))


def windows(result: dict) -> list[tuple[str, float, float]]:
    """(name, t0, t1) of each calibration pass and measured rate, in time order."""
    w = [(f"pass {k}", p["t0"], p["t1"]) for k, p in enumerate(result["calibration_passes"]["passes"])]
    w += [(f"rate {r['rate']:g}", r["t0"], r["t1"]) for r in result["rows"]]
    return sorted(w, key=lambda x: x[1])


def trace_file(trace_dir: Path, side: str) -> Path:
    p = trace_dir / f"{side}.jsonl"
    return p if p.exists() else trace_dir / f"{side}.jsonl.gz"


def analyse(result: dict, trace_dir: Path) -> dict:
    cal = result["served_calibration"]
    fit = {s: CostModel.from_dict(cal[f"{s}_cost_model"]) for s in ("prefill", "decode")}
    steps = {s: read_step_trace_timed(trace_file(trace_dir, s)) for s in ("prefill", "decode")}
    out = {"windows": [], "bins": {}, "factor": {}}
    per_step = {s: [] for s in fit}  # (window, co-busy fraction, log ratio, seconds)
    for name, t0, t1 in windows(result):
        row = {"window": name}
        for side, other in SIDES:
            mine = [x for x in steps[side] if t0 <= x[0] <= t1]
            fr = co_busy_fractions(mine, steps[other])
            secs = sum(s for _, _, s in mine)
            row[side] = {"steps": len(mine),
                         "speed": secs / sum(fit[side].predict_shape(sh) for _, sh, _ in mine),
                         "co_busy": sum(f * s for f, (_, _, s) in zip(fr, mine)) / secs,
                         "busy": secs / (t1 - t0),
                         "mean_tokens": sum(sh.num_tokens for _, sh, _ in mine) / len(mine),
                         "mean_reqs": sum(sh.num_reqs for _, sh, _ in mine) / len(mine)}
            per_step[side] += [(name, f, math.log(s / fit[side].predict_shape(sh)), s) for f, (_, sh, s) in zip(fr, mine)]
        out["windows"].append(row)
    t_all = (min(t for _, t, _ in windows(result)), max(t for _, _, t in windows(result)))
    for side, other in SIDES:
        mine = [x for x in steps[side] if t_all[0] <= x[0] <= t_all[1]]
        out["factor"][side] = co_busy_factor(fit[side], mine, steps[other])
        out["bins"][side] = [{"bin": [lo, hi], "steps": len(v), "ratio": math.exp(sum(v) / len(v)) if v else None}
                             for lo, hi in BINS for v in [[y for _, f, y, _ in per_step[side] if lo <= f < hi]]]
    # the measured rates' extra producer time over the passes', before and after taking the co-busy line out
    b = math.log(out["factor"]["prefill"]["factor"])
    rows = per_step["prefill"]
    passes = [r for r in rows if r[0].startswith("pass")]
    for name in sorted({r[0] for r in rows if r[0].startswith("rate")}):
        rate = [r for r in rows if r[0] == name]
        raw = tw_mean([y for *_, y, _ in rate], rate) - tw_mean([y for *_, y, _ in passes], passes)
        left = (tw_mean([y - b * f for _, f, y, _ in rate], rate)
                - tw_mean([y - b * f for _, f, y, _ in passes], passes))
        out.setdefault("rate_excess", {})[name] = {"raw": math.exp(raw), "after_co_busy": math.exp(left)}
    return out


def tw_mean(ys: list[float], rows: list[tuple]) -> float:
    w = [r[3] for r in rows]
    return sum(y * x for y, x in zip(ys, w)) / sum(w)


def report(name: str, a: dict) -> None:
    print(f"{name}")
    print(f"  {'window':8s} | producer: steps speed co-busy busy tokens/step | consumer: steps speed co-busy batch")
    for w in a["windows"]:
        p, d = w["prefill"], w["decode"]
        print(f"  {w['window']:8s} | {p['steps']:4d} {p['speed']:.3f} {p['co_busy']:.2f} {p['busy']:.2f} "
              f"{p['mean_tokens']:5.0f} | {d['steps']:5d} {d['speed']:.3f} {d['co_busy']:.2f} {d['mean_reqs']:5.1f}")
    for side in ("prefill", "decode"):
        f = a["factor"][side]
        bins = ", ".join(f"[{b['bin'][0]:.2f},{b['bin'][1]:.2f}) {b['steps']} steps x{b['ratio']:.3f}"
                         for b in a["bins"][side] if b["steps"])
        print(f"  {side}: co-busy factor {f['factor']:.3f} (r {f['r']:+.2f}; {f['alone_steps']} steps mostly alone, "
              f"{f['co_busy_steps']} mostly co-busy); by co-busy fraction: {bins}")
    for k, v in a.get("rate_excess", {}).items():
        print(f"  {k}: producer time over the passes' x{v['raw']:.3f}, x{v['after_co_busy']:.3f} after the co-busy line")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="RESULT.json TRACE_DIR, repeated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if len(args.pairs) % 2:
        ap.error("give each result JSON with its trace directory")
    res = {}
    for rj, td in zip(args.pairs[::2], args.pairs[1::2]):
        res[rj] = analyse(json.loads(Path(rj).read_text()), Path(td))
        report(rj, res[rj])
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
