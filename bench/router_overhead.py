"""Router overhead: TTFT p50 at 32 concurrent streams, direct to a backend vs through `tokenmill router` (the
same backend), measured with `tokenmill bench serve`. Two backends: the real default model, and the fake
engine of the HTTP tests (tests/server/fake_engine.py: 2 ms steps, no model), which isolates the router's
own cost from the engine's queueing noise. Direct and routed runs alternate, `--repeats` times each.

    flock /work/bench.lock python bench/router_overhead.py [--backend real|fake] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.server.serve_proc import free_port  # noqa: E402

FAKE_SERVER = """
import sys, uvicorn
sys.path.insert(0, {tests!r})
from fake_engine import FakeEngine
from tokenmill.server.app import build_app
from tokenmill.server.config import ServerConfig
uvicorn.run(build_app(FakeEngine(max_model_len=4096), ServerConfig()), host="127.0.0.1", port={port},
            log_level="warning")
"""


def start(cmd: list[str], url: str, timeout_s: float = 600) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise SystemExit(f"{cmd} exited with {p.returncode}")
        time.sleep(0.2)
    p.kill()
    raise SystemExit(f"{cmd} did not start")


def bench(url: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", url, "--workload",
                        args.workload, "--rate", "inf", "--num-requests", str(args.num_requests), "--max-concurrency",
                        "32", "--endpoint", "completions", "--no-progress", "--out", f.name], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
        res = json.load(open(f.name))
    r = res["results"][0]["summary"]
    return {"ttft_p50_ms": r["ttft_ms"]["p50"], "tpot_p50_ms": r["tpot_ms"]["p50"], "completed": r.get("completed")}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["real", "fake"], default="fake")
    ap.add_argument("--policy", default="round-robin")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--workload", default="fixed:128:32")
    args = ap.parse_args()
    bport, rport = free_port(), free_port()
    burl, rurl = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{rport}"
    if args.backend == "fake":
        code = FAKE_SERVER.format(tests=str(ROOT / "tests" / "server"), port=bport)
        backend = start([sys.executable, "-c", code], burl)
    else:
        backend = start([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(bport)], burl)
    router = start([sys.executable, "-m", "tokenmill.cli", "router", "--port", str(rport), "--backend", burl,
                    "--policy", args.policy], rurl)
    try:
        bench(burl, args)  # warm-up
        runs = {"direct": [], "router": []}
        router_cpu = []
        for _ in range(args.repeats):
            runs["direct"].append(bench(burl, args))
            c0 = cpu_s(router.pid)
            runs["router"].append(bench(rurl, args))
            router_cpu.append((cpu_s(router.pid) - c0) / args.num_requests * 1e3)
        out = {k: [r["ttft_p50_ms"] for r in v] for k, v in runs.items()}
        med = {k: statistics.median(v) for k, v in out.items()}
        print(json.dumps({"backend": args.backend, "policy": args.policy, "workload": args.workload,
                          "ttft_p50_ms_runs": out, "ttft_p50_ms_median": med,
                          "overhead_ms": med["router"] - med["direct"],
                          "router_cpu_ms_per_request": router_cpu,
                          "tpot_p50_ms": {k: [r["tpot_p50_ms"] for r in v] for k, v in runs.items()}}, indent=1))
    finally:
        for p in (router, backend):
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    main()
