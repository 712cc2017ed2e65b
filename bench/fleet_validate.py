"""The fleet simulator (tokenmill/perf/fleet.py) against a real 2-instance run on this machine.

--mode colocated (default): 1. calibrate the cost model for one instance's share of the machine (--num-threads 1:
   each instance gets one core), or --calibration FILE; 2. start `tokenmill serve --data-parallel-size 2` (two engine
   processes pinned to their own cores behind one API, --data-parallel-policy); 3. `bench serve` at each rate;
   4. `simulate_fleet` of the same requests and arrivals over 2 colocated instances with the same routing policy;
   5. print measured vs predicted TTFT / TPOT p50 and output tok/s.
--mode disagg: the same over one prefill and one decode instance: 1. the calibration; 2. the KV transfer cost per
   block, measured here (bench/kv_transfer.py's pull through the real TCP connector, the servers' KV dtype and
   model shape, at --transfer-tokens prompt lengths) or --transfer-ms-per-block; 3. `tokenmill serve --kv-role
   producer` and `--kv-role consumer` (each --num-threads 1) behind `tokenmill router --prefill P --decode D`;
   4. `bench serve` through the router; 5. `simulate_fleet` over 1P + 1D with that transfer cost.

  flock /work/bench.lock env PYTHONPATH=. python bench/fleet_validate.py --workload chat --rate 1,2 \\
      --num-requests 40 [--mode disagg] [--policy least-load] [--calibration cal.json] [--out result.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from goodput_compare import default_tokenizer, serve_cmd  # noqa: E402
from goodput_validate import _pick, calibrate_default, drift_of_trace, reference_times  # noqa: E402

from tokenmill.bench.launch import free_port, server_process  # noqa: E402
from tokenmill.bench.serve import parse_rates, run_serve_benchmark  # noqa: E402
from tokenmill.perf.cli import CHAT_TEMPLATE_TOKENS, kv_cache_dtype_for  # noqa: E402
from tokenmill.perf.cost_model import CostModel  # noqa: E402
from tokenmill.perf.fleet import FleetSpec, simulate_fleet  # noqa: E402
from tokenmill.perf.simulator import SimConfig, requests_from_workload  # noqa: E402

ENV = {"PYTHONPATH": str(ROOT)}
# no prefix caching: each rate resends the same seeded prompts (the simulator models no cache either)
COMMON = ["--no-enable-prefix-caching"]
SMOLLM2_HEAD_DIM = 64


def measure_transfer(tokens: list[int], repeats: int, block_size: int = 16) -> dict:
    """Pull times of the real TCP connector between two processes (bench/kv_transfer.py) for the KV dtype the
    servers resolve `--kv-cache-dtype auto` to; per-block cost = least-squares slope and intercept over the sizes."""
    from kv_transfer import run_dtype

    dtype = kv_cache_dtype_for("auto", "auto", "cpu", SMOLLM2_HEAD_DIM)
    args = SimpleNamespace(shape="smollm2-135m", tokens=tokens, repeats=repeats, block_size=block_size,
                           num_blocks=max(tokens) // block_size + 2)
    rows = run_dtype(args, dtype)
    xs = [-(-r["prompt_tokens"] // block_size) for r in rows]
    ys = [r["seconds_median"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"kv_dtype": dtype, "rows": rows, "per_block_s": slope, "fixed_s": my - slope * mx}


@contextlib.contextmanager
def disagg_servers(policy: str, traces: dict[str, Path]) -> Iterator[tuple[str, str, str]]:
    """A producer and a consumer instance (one core each, step traces at traces["prefill"] / ["decode"]) behind
    `tokenmill router --prefill --decode`: yields (router URL, producer URL, consumer URL)."""
    kv_port = free_port()
    one_core = [*COMMON, "--num-threads", "1"]
    prod = serve_cmd("fcfs", 10000, 1000, [*one_core, "--step-trace", str(traces["prefill"]), "--kv-role", "producer",
                                           "--kv-transfer-host", "127.0.0.1", "--kv-transfer-port", str(kv_port)])
    cons = serve_cmd("fcfs", 10000, 1000, [*one_core, "--step-trace", str(traces["decode"]), "--kv-role", "consumer"])
    with server_process(prod, log_path="/tmp/fleet_validate_producer.log", env=ENV) as p_url, \
            server_process(cons, log_path="/tmp/fleet_validate_consumer.log", env=ENV) as d_url:
        router = [sys.executable, "-m", "tokenmill.cli", "router", "--prefill", p_url, "--decode", d_url,
                  "--policy", policy, "--port", "{port}"]
        with server_process(router, log_path="/tmp/fleet_validate_router.log", env=ENV) as r_url:
            yield r_url, p_url, d_url


def _ttft(url: str, model: str) -> float:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                return time.perf_counter() - t0
    raise RuntimeError(f"no stream from {url}")


def measure_hop(router: str, producer: str, repeats: int = 7) -> dict:
    """The router's second hop at idle: TTFT of a short chat request through the router (producer, router, the
    consumer's first token) minus its TTFT straight from the producer; medians of alternating runs."""
    import httpx

    model = httpx.get(producer + "/v1/models", timeout=10).json()["data"][0]["id"]
    via, direct = [], []
    for _ in range(repeats):
        via.append(_ttft(router, model))
        direct.append(_ttft(producer, model))
    return {"router_ttft_s": statistics.median(via), "direct_ttft_s": statistics.median(direct),
            "hop_s": max(0.0, statistics.median(via) - statistics.median(direct))}


def kv_counters(base: str) -> dict:
    """The consumer's tokenmill:kv_transfer_* counters (pulls done / failed: a failed pull is a recompute)."""
    import httpx

    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tokenmill:kv_transfer_") and not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            out[name.split("{")[0].removeprefix("tokenmill:")] = float(val)
    return out


def run_rates(base: str, args, rates: list[float], tok, cost: CostModel, traces: dict[str, Path],
              kv_url: str = "") -> list:
    """`bench serve` at each rate: (result, extra row fields); run_speed_vs_calibration: per step trace, the
    instances' measured step times over the calibration's predictions for the same steps during that rate."""
    measured = []
    for i, rate in enumerate(rates):
        before = kv_counters(kv_url) if kv_url else {}
        t0 = time.time()
        m = run_serve_benchmark(base, args.workload, [rate], num_requests=args.num_requests, seed=0,
                                progress=False, tokenizer=tok, warmup=i == 0)[0]
        t1 = time.time()
        after = kv_counters(kv_url) if kv_url else {}
        measured.append((m, {"start_utc": time.strftime("%H:%M:%S", time.gmtime(t0)),
                             "end_utc": time.strftime("%H:%M:%S", time.gmtime(t1)),
                             "run_speed_vs_calibration": {k: drift_of_trace(p, t0, t1, cost) for k, p in traces.items()},
                             **{k: after[k] - before.get(k, 0.0) for k in after}}))
    return measured


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="colocated", choices=["colocated", "disagg"],
                    help="colocated: serve --data-parallel-size 2; disagg: 1 producer + 1 consumer behind the router")
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--rate", default="1,2")
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--policy", default="least-load", choices=["round-robin", "least-load", "prefix"])
    ap.add_argument("--calibration", default=None, help="a saved one-thread calibration instead of calibrating")
    ap.add_argument("--save-calibration", default="/tmp/tokenmill_cpu_calibration_1t.json")
    ap.add_argument("--transfer-ms-per-block", type=float, default=None,
                    help="disagg: the KV transfer cost per block instead of measuring it")
    ap.add_argument("--transfer-tokens", default="32,128,512,2048", help="disagg: prompt lengths of the measured pulls")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tok = default_tokenizer()
    load0 = os.getloadavg()[0]
    cost = CostModel.load(args.calibration) if args.calibration else calibrate_default(args.save_calibration, 1)
    ref = reference_times(cost)
    print(f"one-thread cost model: decode step {ref['decode_ms']:.1f} ms, 512-token prefill "
          f"{ref['prefill_512_ms']:.0f} ms", flush=True)
    rates = parse_rates(args.rate)
    transfer = hop = None
    tmp = tempfile.TemporaryDirectory()
    if args.mode == "colocated":
        traces = {"all": Path(tmp.name) / "steps.jsonl"}  # both engine processes append to it
        cmd = serve_cmd("fcfs", 10000, 1000, [*COMMON, "--step-trace", str(traces["all"]), "--data-parallel-size", "2",
                                              "--data-parallel-policy", args.policy])
        with server_process(cmd, log_path="/tmp/fleet_validate.log", env=ENV) as base:
            measured = run_rates(base, args, rates, tok, cost, traces)
        spec = FleetSpec(instances=2, router_policy=args.policy)
    else:
        if args.transfer_ms_per_block is not None:
            transfer = {"per_block_s": args.transfer_ms_per_block / 1e3, "given": True}
        else:
            transfer = measure_transfer([int(t) for t in args.transfer_tokens.split(",")], 3)
            print(f"KV transfer ({transfer['kv_dtype']}): {transfer['per_block_s'] * 1e3:.2f} ms per block + "
                  f"{transfer['fixed_s'] * 1e3:.1f} ms per pull", flush=True)
        traces = {k: Path(tmp.name) / f"{k}.jsonl" for k in ("prefill", "decode")}
        with disagg_servers(args.policy, traces) as (base, p_url, d_url):
            hop = measure_hop(base, p_url)
            print(f"router's second hop at idle: {hop['hop_s'] * 1e3:.1f} ms (TTFT {hop['router_ttft_s'] * 1e3:.0f} ms "
                  f"through the router, {hop['direct_ttft_s'] * 1e3:.0f} ms from the producer)", flush=True)
            measured = run_rates(base, args, rates, tok, cost, traces, kv_url=d_url)
        spec = FleetSpec(instances=2, prefill_instances=1, router_policy=args.policy,
                         transfer_s_per_block=max(0.0, transfer["per_block_s"]),
                         transfer_s_per_pull=max(0.0, transfer.get("fixed_s", 0.0)), hop_s=hop["hop_s"])
    rows = []
    for m, extra in measured:
        reqs = requests_from_workload(args.workload, args.num_requests, m.rate, 0,
                                      chat_overhead=CHAT_TEMPLATE_TOKENS, tokenizer=tok)
        sim = simulate_fleet(reqs, cost, SimConfig(policy="fcfs"), spec, rate=m.rate)
        pred, meas = _pick(sim.summary()), _pick(m.summary)
        speed = extra["run_speed_vs_calibration"]  # the machine's drift since calibrating taken out
        front, back = speed.get("all") or speed.get("prefill") or 1.0, speed.get("all") or speed.get("decode") or 1.0
        at_speed = _pick(simulate_fleet(reqs, cost.scaled(front), SimConfig(policy="fcfs"), spec, rate=m.rate,
                                        decode_cost=cost.scaled(back)).summary())
        err = {k: pred[k] / meas[k] - 1 for k in ("ttft_p50_ms", "tpot_p50_ms", "output_tok_s") if meas[k]}
        err_speed = {k: at_speed[k] / meas[k] - 1 for k in err}
        rows.append({"rate": m.rate, "measured": meas, "predicted": pred, "error": err,
                     "within_20pct": all(abs(e) <= 0.2 for e in err.values()), "predicted_at_run_speed": at_speed,
                     "error_at_run_speed": err_speed, **extra,
                     # per request, in arrival order: [prompt tokens, output tokens, TTFT s, TPOT s]
                     "measured_requests": [[r.prompt_len, r.output_tokens, r.ttft_s, r.tpot_s]
                                           for r in sorted(m.records, key=lambda r: r.scheduled_s)],
                     "predicted_requests": [list(x[:4]) for x in sim.records]})
    print(f"{spec.label}, {args.workload}, {args.num_requests} requests")
    print(f"{'rate':>5} | {'TTFT p50 meas / pred':>27} | {'TPOT p50 meas / pred':>27} | {'out tok/s meas / pred':>27}")
    for r in rows:
        m = r["measured"]
        for label, p, e in (("", r["predicted"], r["error"]),
                            ("  at run speed", r["predicted_at_run_speed"], r["error_at_run_speed"])):
            print(f"{r['rate']:>5g} | {m['ttft_p50_ms']:>8.0f} / {p['ttft_p50_ms']:>6.0f} ({e['ttft_p50_ms']:+.0%}) | "
                  f"{m['tpot_p50_ms']:>8.1f} / {p['tpot_p50_ms']:>6.1f} ({e['tpot_p50_ms']:+.0%}) | "
                  f"{m['output_tok_s']:>8.1f} / {p['output_tok_s']:>6.1f} ({e['output_tok_s']:+.0%}){label}")
        print(f"      run speed vs calibration (step time measured / predicted): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["run_speed_vs_calibration"].items() if v))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "mode": args.mode, "fleet": spec.label, "workload": args.workload, "num_requests": args.num_requests,
            "policy": args.policy, "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
            "cost_model": cost.to_dict(), "calibration": ref, "transfer": transfer, "hop": hop,
            "spec": {"transfer_s_per_block": spec.transfer_s_per_block, "transfer_s_per_pull": spec.transfer_s_per_pull,
                     "hop_s": spec.hop_s}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
