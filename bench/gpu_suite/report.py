"""Merge the steps' JSON (WORK/<step>.json, or the driver's WORK/<step>.status when a step wrote none) into
OUT/gpu_suite.json and print the table (also written to OUT/gpu_suite.md). Pure Python: no torch."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Optional

OK_STATUSES = ("ok",)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def collect(work: str, steps: list[str]) -> list[dict[str, Any]]:
    """One entry per step, in order: its JSON, else a failed/timeout/skipped entry from the driver's notes."""
    out = []
    for name in steps:
        text = _read(os.path.join(work, f"{name}.json"))
        entry: Optional[dict[str, Any]] = None
        if text:
            try:
                entry = json.loads(text)
            except ValueError:
                entry = None
        driver = (_read(os.path.join(work, f"{name}.status")) or "").strip()
        if entry is None:
            log = _read(os.path.join(work, f"{name}.log")) or ""
            entry = {"name": name, "status": driver or "failed: wrote no result", "rows": [], "details": {},
                     "errors": [], "log_tail": log[-1500:]}
        elif driver.startswith(("timeout", "failed")):  # it saved partial rows before it was stopped
            entry["status"] = f"{driver} (after: {entry.get('status')})"
        limit = _read(os.path.join(work, f"{name}.limit"))
        if limit:
            entry["limit_s"] = float(limit)
        secs = _read(os.path.join(work, f"{name}.secs"))
        if secs:
            entry["seconds"] = float(secs)
        out.append(entry)
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def _target(r: dict[str, Any]) -> str:
    t = r.get("target")
    if t is None:
        return ""
    op = ">=" if r.get("higher_is_better", True) else "<="
    if r.get("ref"):
        return f"ratio {op} {t:g}"
    return f"{op} {t:g} {r.get('unit', '')}".strip()


def format_table(meta: dict[str, Any], steps: list[dict[str, Any]]) -> str:
    head = ["step", "metric", "value", "reference", "ratio", "target", "met", "note"]
    lines = [f"# tokenmill GPU suite: {meta['device']}, {meta['date']}{' (dry run)' if meta['dry_run'] else ''}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in steps:
        secs = s.get("seconds")
        lim = s.get("limit_s")
        timing = f"{secs:.0f} s" if isinstance(secs, (int, float)) else ""
        if lim:
            timing += f" of {lim:.0f} s"
        lines.append(f"| **{s['name']}** | status: {s['status']} |  |  |  |  |  | {timing} |")
        for r in s.get("rows", []):
            value = f"{_fmt(r.get('value'))} {r.get('unit', '')}".strip()
            ref = f"{_fmt(r['ref'])} ({r.get('ref_label', '')})" if r.get("ref") is not None else ""
            ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
            met = "" if r.get("met") is None else ("yes" if r["met"] else "NO")
            note = str(r.get("note", "")).replace("|", "/")
            metric = str(r["metric"]).replace("|", "/")
            lines.append(f"| {s['name']} | {metric} | {value} | {ref} | {ratio} | {_target(r)} | {met} | {note} |")
    n_ok = sum(1 for s in steps if step_passed(s))
    lines.append("")
    lines.append(f"{n_ok}/{len(steps)} steps ok or skipped; total {meta['seconds']:.0f} s")
    return "\n".join(lines)


def step_passed(s: dict[str, Any]) -> bool:
    """ok, skipped for want of CUDA, or an optional step left out for want of time."""
    st = s["status"]
    return st in OK_STATUSES or st.startswith("skipped: no CUDA") or (st.startswith("skipped") and "optional" in st)


def write_report(work: str, out: str, steps: list[str], dry: bool, started: Optional[float] = None,
                 quiet: bool = False) -> int:
    entries = collect(work, steps)
    dev = next((e.get("details", {}).get("device") for e in entries if e.get("name") == "device"), None)
    versions = next((e.get("details", {}).get("versions") for e in entries if e.get("name") == "device"), None)
    meta = {"suite": "tokenmill GPU suite (bench/gpu_suite.sh)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "dry_run": dry, "device": dev or f"no CUDA ({platform.machine()})", "versions": versions,
            "seconds": time.time() - started if started else 0.0}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_suite.json"), "w") as f:
        json.dump({**meta, "steps": entries}, f, indent=1, default=str)
    table = format_table(meta, entries)
    with open(os.path.join(out, "gpu_suite.md"), "w") as f:
        f.write(table + "\n")
    if not quiet:
        print(table)
    return 0 if all(step_passed(e) for e in entries) else 1
