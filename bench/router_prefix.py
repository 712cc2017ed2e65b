"""Prefix-aware vs round-robin routing over 2 real backends (the default model on this machine), with
`tokenmill bench serve`: prefix-cache hit rate (from the backends' /metrics, the run's delta) and TTFT p50,
against one backend alone. Fresh backends for every run (empty caches).

    flock /work/bench.lock python bench/router_prefix.py [--workloads W1,W2] [--num-requests 60] [--rate 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.router_overhead import start  # noqa: E402
from tests.server.serve_proc import free_port  # noqa: E402

BACKEND_ARGS = ["--max-model-len", "4096", "--max-num-seqs", "32"]


def prefix_counts(url: str) -> tuple[float, float]:
    vals = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for k in ("tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total"):
            if line.startswith(k + " "):
                vals[k] = float(line.split()[1])
    return vals.get("tokenmill:prefix_cache_queries_total", 0.0), vals.get("tokenmill:prefix_cache_hits_total", 0.0)


def run(mode: str, workload: str, args) -> dict:
    n = 1 if mode == "single" else 2
    ports = [free_port() for _ in range(n)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = [start([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(p), *BACKEND_ARGS], u)
             for p, u in zip(ports, urls)]
    try:
        target = urls[0]
        if mode != "single":
            rport = free_port()
            target = f"http://127.0.0.1:{rport}"
            procs.append(start([sys.executable, "-m", "tokenmill.cli", "router", "--port", str(rport), "--policy", mode,
                                *sum((["--backend", u] for u in urls), [])], target))
        before = [prefix_counts(u) for u in urls]
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", target, "--workload",
                            workload, "--rate", str(args.rate), "--num-requests", str(args.num_requests), "--seed", "0",
                            "--no-progress", "--out", f.name], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            s = json.load(open(f.name))["results"][0]["summary"]
        after = [prefix_counts(u) for u in urls]
        q = sum(a[0] - b[0] for a, b in zip(after, before))
        h = sum(a[1] - b[1] for a, b in zip(after, before))
        return {"mode": mode, "workload": workload, "hit_rate": h / q if q else 0.0, "ttft_p50_ms": s["ttft_ms"]["p50"],
                "ttft_p90_ms": s["ttft_ms"]["p90"], "tpot_p50_ms": s["tpot_ms"]["p50"], "completed": s["completed"],
                "num_requests": s["num_requests"]}
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="multi-turn:out_len=16,shared-prefix:prefix_len=600,question_len=40,"
                                           "out_len=16", help="semicolon-free list; entries split at ',<name>:'")
    ap.add_argument("--modes", default="single,round-robin,prefix")
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=2.0)
    args = ap.parse_args()
    workloads = []
    for part in args.workloads.split(","):
        if workloads and ":" not in part.split("=")[0] and "=" in part:
            workloads[-1] += "," + part
        else:
            workloads.append(part)
    rows = [run(m, w, args) for w in workloads for m in args.modes.split(",")]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
