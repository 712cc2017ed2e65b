"""Summaries of measured requests: latency percentiles, throughput, SLO attainment and goodput.

Goodput follows DistServe: the requests per second that meet both their TTFT and TPOT targets.
SLO attainment is the fraction of all requests (failed ones included, as misses) that meet both.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Optional

import numpy as np

from tokenmill.bench.types import RequestRecord

PERCENTILES = (50, 90, 99)
GOODPUT_ATTAINMENT = 0.9


def latency_stats(values_s: Iterable[float]) -> dict[str, Optional[float]]:
    """mean / p50 / p90 / p99 / max of values given in seconds, returned in milliseconds (None if empty)."""
    arr = np.asarray([v for v in values_s if v is not None], dtype=np.float64) * 1e3
    if arr.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None, "n": 0}
    out: dict[str, Optional[float]] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["max"] = float(arr.max())
    out["n"] = int(arr.size)
    return out


def apply_slo(records: Iterable[RequestRecord], slo_ttft_ms: Optional[float], slo_tpot_ms: Optional[float]) -> None:
    """Fill each record's targets: its own (per-request) target wins, else the global one."""
    for r in records:
        if r.slo_ttft_ms is None:
            r.slo_ttft_ms = slo_ttft_ms
        if r.slo_tpot_ms is None:
            r.slo_tpot_ms = slo_tpot_ms


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    """Per-run summary: counts, throughput, latency stats (ms), SLO attainment and goodput."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    good = sum(1 for r in records if r.meets_slo())
    dur = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.prompt_len for r in ok)
    errors = Counter(r.error.split(":")[0] if r.error else "unknown" for r in failed)
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "failed_429": sum(1 for r in failed if r.status == 429),
        "errors": dict(errors.most_common(5)),
        "duration_s": duration_s,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tokens / dur,
        "input_throughput": in_tokens / dur,
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
        "ttft_ms": latency_stats(r.ttft_s for r in ok),
        "tpot_ms": latency_stats(r.tpot_s for r in ok),
        "itl_ms": latency_stats(x for r in ok for x in r.itl_s),
        "e2e_ms": latency_stats(r.e2e_s for r in ok),
        "good_requests": good,
        "slo_attainment": good / len(records) if records else 0.0,
        "goodput": good / dur,
    }
