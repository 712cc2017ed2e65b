"""Results of a serving benchmark: JSON file, plain-text table, PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from tokenmill.bench.serve import GoodputResult, RateResult


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def build_results(config: dict[str, Any], results: list[RateResult], goodput: Optional[GoodputResult] = None,
                  keep_text: bool = False) -> dict[str, Any]:
    """The results document: config, per-rate summaries with per-request records, goodput search."""
    doc: dict[str, Any] = {
        "config": config,
        "results": [{"rate": _rate_label(r.rate), "summary": r.summary,
                     "requests": [rec.to_dict(keep_text) for rec in r.records]} for r in results],
    }
    if goodput is not None:
        doc["goodput_search"] = {"goodput_rate": goodput.rate, "target_attainment": goodput.target,
                                 "probes": [{"rate": _rate_label(p.rate), "slo_attainment": p.slo_attainment,
                                             "goodput": p.goodput} for p in goodput.probes]}
    return doc


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_results(path: str, doc: dict[str, Any]) -> None:
    """Write the results document as indented JSON (non-finite numbers are written as strings)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_clean(doc), indent=1, default=str, allow_nan=False) + "\n")


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


_COLS = ("rate", "done", "fail", "req/s", "out tok/s", "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99",
         "ITL p50", "E2E p50", "p99", "SLO ok", "goodput")


def format_table(results: list[RateResult]) -> str:
    """A plain-text table, one row per rate (latencies in ms)."""
    rows = [list(_COLS)]
    for r in results:
        s = r.summary
        t, p, i, e = s["ttft_ms"], s["tpot_ms"], s["itl_ms"], s["e2e_ms"]
        rows.append([_rate_label(r.rate), str(s["completed"]), str(s["failed"]), f"{s['request_throughput']:.2f}",
                     f"{s['output_throughput']:.1f}", _ms(t["p50"]), _ms(t["p90"]), _ms(t["p99"]),
                     _ms(p["p50"]), _ms(p["p90"]), _ms(p["p99"]), _ms(i["p50"]), _ms(e["p50"]), _ms(e["p99"]),
                     f"{100 * s['slo_attainment']:.1f}%", f"{s['goodput']:.2f}"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(_COLS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(results: list[RateResult], goodput: Optional[GoodputResult] = None) -> str:
    """Table plus failure and goodput-search lines."""
    out = [format_table(results)]
    for r in results:
        if r.summary["failed"]:
            out.append(f"rate {_rate_label(r.rate)}: {r.summary['failed']} failed "
                       f"({r.summary['failed_429']} HTTP 429); errors: {r.summary['errors']}")
    if goodput is not None:
        out.append(f"goodput: {goodput.rate:.3g} req/s (highest probed rate with >= {100 * goodput.target:.0f}% "
                   f"of requests meeting both SLOs; {len(goodput.probes)} probes)")
    return "\n".join(out)


def _cdf(ax: Any, values: list[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(k + 1) / len(xs) for k in range(len(xs))], where="post", label=label)


def plot_results(results: list[RateResult], path: str, goodput: Optional[GoodputResult] = None,
                 slo_ttft_ms: Optional[float] = None, slo_tpot_ms: Optional[float] = None) -> None:
    """One PNG: TTFT CDF and TPOT CDF per rate, and SLO attainment / goodput vs rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_ttft, ax_tpot, ax_rate = axes
    for r in results:
        ok = [rec for rec in r.records if rec.success]
        label = f"{_rate_label(r.rate)} req/s"
        _cdf(ax_ttft, [rec.ttft_s * 1e3 for rec in ok if rec.ttft_s is not None], label)
        _cdf(ax_tpot, [rec.tpot_s * 1e3 for rec in ok if rec.tpot_s is not None], label)
    for ax, name, slo in ((ax_ttft, "TTFT", slo_ttft_ms), (ax_tpot, "TPOT", slo_tpot_ms)):
        if slo is not None:
            ax.axvline(slo, color="k", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    curve = sorted(list(results) + (list(goodput.probes) if goodput else []), key=lambda r: r.rate)
    finite = [r for r in curve if not math.isinf(r.rate)]
    if finite:
        xs = [r.rate for r in finite]
        ax_rate.plot(xs, [r.goodput for r in finite], "o-", label="goodput (req/s)")
        ax_rate.plot(xs, [r.summary["request_throughput"] for r in finite], "s--", label="throughput (req/s)")
        ax2 = ax_rate.twinx()
        ax2.plot(xs, [100 * r.slo_attainment for r in finite], "^:", color="tab:green", label="SLO attainment (%)")
        ax2.axhline(90, color="tab:green", linewidth=0.8, alpha=0.5)
        ax2.set_ylim(0, 105)
        ax2.set_ylabel("SLO attainment (%)")
        ax2.legend(loc="lower right", fontsize=8)
        if goodput is not None and goodput.rate > 0:
            ax_rate.axvline(goodput.rate, color="tab:red", linestyle="--", linewidth=1,
                            label=f"goodput rate {goodput.rate:.3g}")
    ax_rate.set_xlabel("request rate (req/s)")
    ax_rate.set_ylabel("req/s")
    ax_rate.set_title("goodput and attainment vs rate")
    ax_rate.grid(alpha=0.3)
    ax_rate.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
