"""Prefix-aware vs round-robin routing over 2 real backends (the default model on this machine), with
`tokenmill bench serve`: prefix-cache hit rate (from the backends' /metrics, the run's delta) and TTFT p50,
against one backend alone. Each mode gets its own fresh backends (empty caches).

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


def start_all(n: int) -> tuple[list[subprocess.Popen], list[str]]:
    """n backends started at once (they load in parallel)."""
    ports = [free_port() for _ in range(n)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(p), *BACKEND_ARGS], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    for u in urls:
        _wait(u)
    return procs, urls


def _wait(url: str, timeout_s: float = 900) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not start")


def run(mode: str, urls: list[str], workload: str, args) -> dict:
    """One bench serve run: "single" straight to urls[0], else through a fresh router over urls."""
    procs = []
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
        for p in procs:
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
    modes = args.modes.split(",")
    # one backend for "single", two for each router policy: every mode starts with empty caches, and the
    # workloads' prompts differ, so running them one after the other on the same backends shares nothing
    procs, urls = start_all(sum(1 if m == "single" else 2 for m in modes))
    try:
        groups, k = {}, 0
        for m in modes:
            n = 1 if m == "single" else 2
            groups[m], k = urls[k:k + n], k + n
        rows = []
        for w in workloads:
            for m in modes:
                rows.append(run(m, groups[m], w, args))
                print(json.dumps(rows[-1]), flush=True)
        print(json.dumps(rows, indent=1))
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    main()
