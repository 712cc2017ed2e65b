"""Router overhead: TTFT p50 at 32 concurrent streams, direct to a backend vs through `tokenmill router` (the
same backend), measured with `tokenmill bench serve`. Two backends: the real default model, and the fake
engine of the HTTP tests (tests/server/fake_engine.py: 2 ms steps, no model), which isolates the router's
own cost from the engine's queueing noise. Direct and routed runs alternate, `--repeats` times each.
`--compare-root DIR` also routes through the router of another checkout (e.g. `git archive` of an earlier
commit unpacked in DIR), in the same alternation, over the same backend.

    flock /work/bench.lock python bench/router_overhead.py [--backend real|fake] [--repeats 3] [--compare-root DIR]
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


def start(cmd: list[str], url: str, timeout_s: float = 600, root: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def bench(url: str, args, retried: list) -> dict:
    """One `tokenmill bench serve` run. A run that fails (its test request answered 503: the router before the
    asyncio proxy marked its backend down when it reused a keep-alive connection the backend had closed after
    5 s idle) is retried once, 2.5 s later (after a health check has marked the backend up); `retried` gets the URL."""
    for attempt in range(2):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            p = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", url, "--workload",
                                args.workload, "--rate", "inf", "--num-requests", str(args.num_requests),
                                "--max-concurrency", "32", "--endpoint", "completions", "--no-progress", "--out",
                                f.name], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL)
            if p.returncode == 0:
                res = json.load(open(f.name))
                break
        if attempt:
            raise SystemExit(f"bench serve against {url} failed twice")
        retried.append(url)
        time.sleep(2.5)
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
    ap.add_argument("--compare-root", type=Path, help="also route through the router of this checkout")
    args = ap.parse_args()
    if args.compare_root and not (args.compare_root / "tokenmill" / "router").is_dir():
        raise SystemExit(f"--compare-root {args.compare_root}: no tokenmill/router there")
    bport, rport, cport = free_port(), free_port(), free_port()
    burl, rurl = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{rport}"
    if args.backend == "fake":
        code = FAKE_SERVER.format(tests=str(ROOT / "tests" / "server"), port=bport)
        backend = start([sys.executable, "-c", code], burl)
    else:
        backend = start([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(bport)], burl)
    routers = {"router": (start([sys.executable, "-m", "tokenmill.cli", "router", "--port", str(rport), "--backend",
                                 burl, "--policy", args.policy], rurl), rurl)}
    if args.compare_root:
        curl = f"http://127.0.0.1:{cport}"
        routers["router_compare"] = (start([sys.executable, "-m", "tokenmill.cli", "router", "--port", str(cport),
                                            "--backend", burl, "--policy", args.policy], curl,
                                           root=args.compare_root.resolve()), curl)
    try:
        retried: list[str] = []
        bench(burl, args, retried)  # warm-up
        for _, url in routers.values():
            bench(url, args, retried)
        runs: dict[str, list] = {"direct": [], **{k: [] for k in routers}}
        cpu: dict[str, list] = {k: [] for k in routers}
        for _ in range(args.repeats):
            runs["direct"].append(bench(burl, args, retried))
            for k, (proc, url) in routers.items():
                c0 = cpu_s(proc.pid)
                runs[k].append(bench(url, args, retried))
                cpu[k].append((cpu_s(proc.pid) - c0) / args.num_requests * 1e3)
        out = {k: [r["ttft_p50_ms"] for r in v] for k, v in runs.items()}
        med = {k: statistics.median(v) for k, v in out.items()}
        res = {"backend": args.backend, "policy": args.policy, "workload": args.workload,
               "ttft_p50_ms_runs": out, "ttft_p50_ms_median": med,
               "overhead_ms": med["router"] - med["direct"], "router_cpu_ms_per_request": cpu["router"],
               "tpot_p50_ms": {k: [r["tpot_p50_ms"] for r in v] for k, v in runs.items()},
               "runs_retried": {k: sum(u == url for u in retried) for k, url in
                                [("direct", burl)] + [(k, url) for k, (_, url) in routers.items()]}}
        if args.compare_root:
            res.update(compare_root=str(args.compare_root), compare_overhead_ms=med["router_compare"] - med["direct"],
                       compare_router_cpu_ms_per_request=cpu["router_compare"])
        print(json.dumps(res, indent=1))
    finally:
        for p in [proc for proc, _ in routers.values()] + [backend]:
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    main()
