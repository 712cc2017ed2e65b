"""Markdown tables of `bench/fleet_validate.py --mode disagg` results: per run and rate, the measured figures and
each prediction's error (the single calibration pass before the rates, the interleaved ones), and the drift
between the calibration passes.

  python bench/fleet_validate_table.py bench/results/s21/fleetcal_disagg_run*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FIGS = ("ttft_p50_ms", "tpot_p50_ms", "output_tok_s")


def _errs(e: dict) -> str:
    return " / ".join(f"{e[k]:+.0%}" for k in FIGS)


def main(paths: list[str]) -> int:
    print("| run | rate | measured TTFT / TPOT p50 ms / out tok/s | single pass | pass before | pass after | "
          "drift-corrected | bracketing (fitted together) | producer step time: run vs pass 0's fit, vs drift-corrected | "
          "CPU during the run: other processes, steal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    drifts = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        name = Path(p).stem
        for r in d["rows"]:
            m, it = r["measured"], r.get("interleaved")
            cells = [f"{m['ttft_p50_ms']:.0f} / {m['tpot_p50_ms']:.1f} / {m['output_tok_s']:.1f}",
                     _errs(r["error_served_calibration"])]
            if it:
                rs = it["run_speed"]
                cells += [_errs(it["preceding"]["error"]), _errs(it["following"]["error"]),
                          _errs(it["drift_corrected"]["error_served_calibration"]),
                          _errs(it["bracketing"]["error_served_calibration"]),
                          f"{rs['vs_first_pass']['prefill']:.3f}, {rs['vs_drift_corrected']['prefill']:.3f}",
                          f"{r['cpu']['others']:.1%}, {r['cpu']['steal']:.1%}" if r.get("cpu") else "not recorded"]
            print(f"| {name} | {r['rate']:g} | " + " | ".join(cells) + " |")
        cp = d.get("calibration_passes") or {}
        if cp:
            drifts.append((name, cp))
    print("\nErrors: TTFT / TPOT p50 / output tok/s, predicted over measured - 1.\n")
    print("| run | passes (UTC) | producer step time vs pass 0 (same requests, pass 0's fit) | consumer | "
          "drift producer / consumer | CPU: other processes, steal (each pass) |")
    print("|---|---|---|---|---|---|")
    for name, cp in drifts:
        ps = cp["passes"]
        print(f"| {name} | " + ", ".join(p["start_utc"] for p in ps) + " | "
              + ", ".join(f"{p['prefill_vs_first_pass'] / ps[0]['prefill_vs_first_pass']:.3f}" for p in ps) + " | "
              + ", ".join(f"{p['decode_vs_first_pass'] / ps[0]['decode_vs_first_pass']:.3f}" for p in ps)
              + f" | {cp['prefill']:.1%} / {cp['decode']:.1%} | "
              + (", ".join(f"{p['cpu']['others']:.1%}, {p['cpu']['steal']:.1%}" for p in ps) if ps[0].get("cpu")
                 else "not recorded") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
