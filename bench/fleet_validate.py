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
   4. the served path's fixed latencies at idle (`ingress_s`: a short request's send through the router to its
   prefill step in the producer's step trace; `hop_s`: that step's end to the first token); 5. a served
   calibration: `bench serve` of other requests of the workload (--served-calibration-seed) through the router,
   and each instance's cost model fitted to its step trace of that pass (tokenmill/perf/step_trace.py), the
   first token's path under that load (tokenmill/perf/served_path.py: the hop to the consumer's engine, the
   delay per other prompt of the same prefill step, the return leg from the consumer's step boundary to the
   client), the engine loops' time between steps and each side's step scatter around its fitted model; 6. `bench serve` through the router at each
   rate, each followed by another calibration pass of the same requests (unless --single-calibration), so that
   every rate is bracketed by a pass just before and one just after it; 7. `simulate_fleet` over 1P + 1D with
   that transfer cost, ingress and hop, from the in-process calibration and from the first pass (the single
   calibration: one run at the fitted step times, and --replicates runs with the steps drawn from the served
   scatter, fleet_replicates: the median and 10-90% band of each figure), and per rate from its bracketing
   passes: each alone, the first pass's calibration scaled by their mean speed against it (drift-corrected: only
   the drift between passes taken out) and both passes fitted together (bracketing). The drift: each pass's
   step times against the first pass's fit (the same requests each time), and each rate's against every fit.
   Every prediction comes from calibration passes of other requests (seed 1), never from the measured rate.
   Each pass's and rate's CPU time is split into this run's processes, other processes and steal
   (bench/cpu_account.py). Tables of results: bench/fleet_validate_table.py.

  flock -x /work/cpu.lock env PYTHONPATH=. python bench/fleet_validate.py --workload chat --rate 1,2 \\
      --num-requests 40 [--mode disagg] [--policy least-load] [--calibration cal.json] [--out result.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_account import share, snapshot  # noqa: E402
from goodput_compare import default_tokenizer, serve_cmd  # noqa: E402
from goodput_validate import _pick, calibrate_default, drift_of_trace, reference_times  # noqa: E402

from tokenmill.bench.launch import free_port, server_process  # noqa: E402
from tokenmill.bench.serve import parse_rates, run_serve_benchmark  # noqa: E402
from tokenmill.perf.cli import CHAT_TEMPLATE_TOKENS, kv_cache_dtype_for  # noqa: E402
from tokenmill.perf.cost_model import CostModel  # noqa: E402
from tokenmill.errors import ConfigError  # noqa: E402
from tokenmill.perf.fleet import FleetSpec, fleet_replicates, replicate_figures, simulate_fleet  # noqa: E402
from tokenmill.perf.served_path import (FirstTokenPath, fit_first_token_path, spread_of_trace,  # noqa: E402
                                        step_gap_of_trace)
from tokenmill.perf.simulator import SimConfig, requests_from_workload  # noqa: E402
from tokenmill.perf.step_trace import fit_passes_like, read_step_trace_timed, speed_drift, trace_speed  # noqa: E402

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


def _ttft(client, url: str, model: str) -> tuple[float, float]:
    """(wall-clock send time, TTFT) of a short streamed chat request (one kept-alive client: a new httpx client per
    request costs ~20 ms of TLS setup on this box, which no served request pays)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2,
            "temperature": 0, "stream": True}
    t_wall, t0 = time.time(), time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                return t_wall, time.perf_counter() - t0
    raise RuntimeError(f"no stream from {url}")


def measure_hop(router: str, producer: str, prefill_trace: Path, repeats: int = 7) -> dict:
    """The served path's fixed latencies at idle, from short chat requests through the router and the producer's
    step trace (medians): `ingress_s`, the client's send to the producer's step start (HTTP through the router, chat
    template, tokenizing, the hand-off to the engine process), and `hop_s`, the prefill step's end to the client's
    first token (the producer's answer to the router, the second hop, the consumer taking the request, the token's
    way back). The TTFT straight from the producer is kept for comparison (the router's share: via - direct)."""
    import httpx

    model = httpx.get(producer + "/v1/models", timeout=10).json()["data"][0]["id"]
    via, direct = [], []
    with httpx.Client() as client:
        for _ in range(repeats):
            via.append(_ttft(client, router, model))
            time.sleep(0.1)
            direct.append(_ttft(client, producer, model))
            time.sleep(0.1)
    time.sleep(0.5)
    rows = read_trace_rows(prefill_trace)
    ingress, hop = [], []
    for t_wall, ttft in via:
        st = [r for r in rows if t_wall <= r["t"] <= t_wall + ttft]
        if st:
            ingress.append(st[0]["t"] - t_wall)
            hop.append(ttft - (st[0]["t"] - t_wall) - st[0]["s"])
    med_via, med_direct = statistics.median(t for _, t in via), statistics.median(t for _, t in direct)
    if not hop:
        raise RuntimeError(f"no prefill steps of the probe requests in {prefill_trace}")
    return {"router_ttft_s": med_via, "direct_ttft_s": med_direct, "router_share_s": max(0.0, med_via - med_direct),
            "ingress_s": max(0.0, statistics.median(ingress)), "hop_s": max(0.0, statistics.median(hop))}


def read_trace_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_pass(base: str, args, rate: float, tok, traces: dict[str, Path]) -> dict:
    """One served calibration pass: `bench serve` of other requests of the workload (seed
    args.served_calibration_seed, the same requests in every pass) through the router, and what each side's step
    trace and the client recorded meanwhile (raw; calibration_of fits them). No warm-up request (the idle probes
    warmed the servers): every prefill step of the pass is one of its requests'."""
    c0, t0 = snapshot(), time.time()
    m = run_serve_benchmark(base, args.workload, [rate], num_requests=args.served_calibration_requests,
                            seed=args.served_calibration_seed, progress=False, tokenizer=tok, warmup=False)[0]
    t1, cpu = time.time(), share(c0, snapshot())
    return {"rate": rate, "cpu": cpu, "seed": args.served_calibration_seed, "num_requests": args.served_calibration_requests,
            "t0": t0, "t1": t1, "start_utc": time.strftime("%H:%M:%S", time.gmtime(t0)),
            "end_utc": time.strftime("%H:%M:%S", time.gmtime(t1)), "measured": _pick(m.summary),
            "timed": {side: read_step_trace_timed(traces[side], t0, t1) for side in ("prefill", "decode")},
            "requests": [(r.start_s, r.ttft_s) for r in m.records if r.success and r.ttft_s is not None]}


def pooled_path(passes: list[dict], ingress_s: float) -> FirstTokenPath:
    """The first-token path fitted to the requests of several passes together (each pass's client clock aligned
    to the wall clock by its first prefill step, as fit_first_token_path_relative does for one)."""
    pre, dec, reqs = [], [], []
    for p in passes:
        steps = [(t, s, sh.num_reqs) for t, sh, s in p["timed"]["prefill"] if sh.num_tokens > sh.num_reqs]
        if not steps or not p["requests"]:
            raise ConfigError("a pass without prefill steps or requests")
        rq = sorted(p["requests"])
        offset = min(t for t, _, _ in steps) - ingress_s - rq[0][0]
        pre += steps
        dec += [(t, s) for t, _, s in p["timed"]["decode"]]
        reqs += [(t + offset, f) for t, f in rq]
    return fit_first_token_path(sorted(pre), sorted(dec), sorted(reqs))


def calibration_of(passes: list[dict], cost: CostModel, ingress_s: float) -> dict:
    """Each side's cost model fitted to its steps of the given passes together ({"prefill": model, "decode":
    model, ...}; fit_passes_like: one pass, or the mean speed of the passes bracketing a measured rate), each
    pass's speed against it, the step scatter around it ({"prefill_spread": StepSpread, ...}), the engine loops'
    time between steps and the first token's path ({"path": ...}, None when a pass's trace does not hold one whole
    prompt per request and step)."""
    out = {"passes": [p["start_utc"] + "-" + p["end_utc"] for p in passes]}
    for side in ("prefill", "decode"):
        per_pass = [[(sh, s) for _, sh, s in p["timed"][side]] for p in passes]
        timed = [x for p in passes for x in p["timed"][side]]
        out[side], out[f"{side}_pass_speeds"] = fit_passes_like(cost, per_pass)
        out[f"{side}_vs_in_process"] = trace_speed(cost, [(sh, s) for _, sh, s in timed])
        out[f"{side}_spread"] = spread_of_trace(out[side], [(sh, s) for _, sh, s in timed], [t for t, _, _ in timed])
        out[f"{side}_step_gap_s"] = statistics.fmean(step_gap_of_trace([(t, s) for t, _, s in p["timed"][side]])
                                                     for p in passes)
    try:
        out["path"] = pooled_path(passes, ingress_s)
    except ConfigError as e:
        print(f"first-token path not fitted ({e}): the idle hop stands", flush=True)
        out["path"] = None
    return out


def pass_summary(p: dict, cost: CostModel, first: dict) -> dict:
    """A pass for the JSON: its window, measured figures and each side's speed against the in-process model and
    against the first pass's served fit (the drift since the first pass)."""
    out = {k: p[k] for k in ("rate", "seed", "num_requests", "start_utc", "end_utc", "t0", "t1", "measured",
                             "requests", "cpu")}
    for side in ("prefill", "decode"):
        samples = [(sh, s) for _, sh, s in p["timed"][side]]
        out[f"{side}_steps"] = len(samples)
        out[f"{side}_vs_in_process"] = trace_speed(cost, samples)
        out[f"{side}_vs_first_pass"] = trace_speed(first[side], samples)
    return out


def run_speed(traces: dict[str, Path], t0: float, t1: float, model_of: dict) -> dict:
    """Each side's measured step time during [t0, t1] over model_of[side]'s predictions (None without steps)."""
    out = {}
    for side in ("prefill", "decode"):
        samples = [(sh, s) for _, sh, s in read_step_trace_timed(traces[side], t0, t1)]
        out[side] = trace_speed(model_of[side], samples) if samples else None
    return out


def spread_summary(sp) -> dict:
    logs = [math.log(r) for _, r in sp.residuals]
    return {"speed_sigma": sp.speed_sigma, "num_residuals": len(logs),
            "residual_log_sd": statistics.pstdev(logs) if len(logs) > 1 else 0.0}


def kv_counters(base: str) -> dict:
    """The consumer's tokenmill:kv_transfer_* counters (pulls done / failed: a failed pull is a recompute)."""
    import httpx

    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tokenmill:kv_transfer_") and not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            out[name.split("{")[0].removeprefix("tokenmill:")] = float(val)
    return out


def run_rate(base: str, args, rate: float, tok, cost: CostModel, traces: dict[str, Path], warmup: bool,
             kv_url: str = "") -> tuple:
    """`bench serve` at one rate (seed 0): (result, extra row fields); run_speed_vs_calibration: per step trace,
    the instances' measured step times over the in-process calibration's predictions for the same steps."""
    before = kv_counters(kv_url) if kv_url else {}
    c0, t0 = snapshot(), time.time()
    m = run_serve_benchmark(base, args.workload, [rate], num_requests=args.num_requests, seed=0,
                            progress=False, tokenizer=tok, warmup=warmup)[0]
    t1, cpu = time.time(), share(c0, snapshot())
    after = kv_counters(kv_url) if kv_url else {}
    return m, {"t0": t0, "t1": t1, "cpu": cpu, "start_utc": time.strftime("%H:%M:%S", time.gmtime(t0)),
               "end_utc": time.strftime("%H:%M:%S", time.gmtime(t1)),
               "run_speed_vs_calibration": {k: drift_of_trace(p, t0, t1, cost) for k, p in traces.items()},
               **{k: after[k] - before.get(k, 0.0) for k in after}}


def served_prediction(reqs, meas: dict, err: dict, spec: FleetSpec, served: dict, rate: float,
                      replicates: int) -> dict:
    """The predictions from the served calibration (each side's model fitted to its steps of that pass): with
    the idle hop and no time between steps as before (for comparison), with the first-token path fitted under
    load and the traced time between steps, and the median and 10-90% band of `replicates` runs with the steps
    drawn from the pass's scatter."""
    path = served["path"]
    spec_s = replace(spec, step_gap_s=served["prefill_step_gap_s"], decode_step_gap_s=served["decode_step_gap_s"])
    if path is not None:
        spec_s = replace(spec_s, hop_s=path.hop_s, return_s=path.return_s, hop_s_per_request=path.hop_s_per_request)
    kw = {"rate": rate, "decode_cost": served["decode"]}
    cfg = SimConfig(policy="fcfs")
    idle = _pick(simulate_fleet(reqs, served["prefill"], cfg, spec, **kw).summary())
    sim_s = simulate_fleet(reqs, served["prefill"], cfg, spec_s, **kw)
    p_s = _pick(sim_s.summary())
    e_s = {k: p_s[k] / meas[k] - 1 for k in err}
    out = {"predicted_served_calibration": p_s, "error_served_calibration": e_s,
           "within_20pct_served_calibration": all(abs(e) <= 0.2 for e in e_s.values()),
           "predicted_served_idle_path": idle, "error_served_idle_path": {k: idle[k] / meas[k] - 1 for k in err},
           "predicted_requests_served_calibration": [list(x[:4]) for x in sim_s.records]}
    if replicates < 1:
        return out
    band = replicate_figures(fleet_replicates(reqs, served["prefill"], cfg, spec_s, served["prefill_spread"],
                                              replicates, decode_spread=served["decode_spread"], **kw))
    e_r = {k: band[k]["median"] / meas[k] - 1 for k in err}
    return {**out, "predicted_served_replicates": band, "error_served_replicates": e_r,
            "within_20pct_served_replicates": all(abs(e) <= 0.2 for e in e_r.values()),
            "measured_within_band": {k: band[k]["p10"] <= meas[k] <= band[k]["p90"] for k in err}}


def print_served(served: dict, first: dict) -> None:
    print(f"served calibration ({first['num_requests']} requests, seed {first['seed']}, {first['rate']:g} req/s, "
          f"{first['start_utc']}-{first['end_utc']}): the served steps took {served['prefill_vs_in_process']:.2f}x "
          f"(prefill), {served['decode_vs_in_process']:.2f}x (decode) the in-process model's predictions; fitted to "
          f"{served['prefill'].info['num_steps']} / {served['decode'].info['num_steps']} steps, median error "
          f"{served['prefill'].info['median_rel_error']:.1%} / {served['decode'].info['median_rel_error']:.1%}",
          flush=True)
    path = served["path"]
    if path is not None:
        print(f"first-token path under load: {path.hop_s * 1e3:.1f} ms to the consumer's engine + "
              f"{path.hop_s_per_request * 1e3:.1f} ms per other prompt of the prefill step, "
              f"{path.return_s * 1e3:.1f} ms from its step boundary to the client", flush=True)
    print(f"between steps: {served['prefill_step_gap_s'] * 1e3:.2f} ms (producer), "
          f"{served['decode_step_gap_s'] * 1e3:.2f} ms (consumer)", flush=True)
    print("step scatter: " + ", ".join(
        f"{k} residual log-sd {v['residual_log_sd']:.3f}, speed sigma {v['speed_sigma']:.3f}"
        for k, v in (("prefill", spread_summary(served["prefill_spread"])),
                     ("decode", spread_summary(served["decode_spread"])))), flush=True)


def run_disagg(args, rates: list[float], tok, cost: CostModel, traces: dict[str, Path]) -> tuple:
    """The disaggregated pair's measured rates with served calibration passes: one before the first rate (the
    single calibration) and, unless --single-calibration, one after each rate (so that every rate is bracketed by
    the passes just before and just after it). Returns (measured, transfer, hop, passes)."""
    if args.transfer_ms_per_block is not None:
        transfer = {"per_block_s": args.transfer_ms_per_block / 1e3, "given": True}
    else:
        transfer = measure_transfer([int(t) for t in args.transfer_tokens.split(",")], 3)
        print(f"KV transfer ({transfer['kv_dtype']}): {transfer['per_block_s'] * 1e3:.2f} ms per block + "
              f"{transfer['fixed_s'] * 1e3:.1f} ms per pull", flush=True)
    for p in traces.values():
        p.unlink(missing_ok=True)
    cal_rate = calibration_rate(args, rates, tok)
    with disagg_servers(args.policy, traces) as (base, p_url, d_url):
        hop = measure_hop(base, p_url, traces["prefill"])
        print(f"served path at idle: {hop['ingress_s'] * 1e3:.1f} ms send -> prefill step, {hop['hop_s'] * 1e3:.1f} "
              f"ms step end -> first token (TTFT {hop['router_ttft_s'] * 1e3:.0f} ms through the router, "
              f"{hop['direct_ttft_s'] * 1e3:.0f} ms from the producer)", flush=True)
        passes = [run_pass(base, args, cal_rate, tok, traces)]
        print_served(calibration_of(passes, cost, hop["ingress_s"]), passes[0])
        measured = []
        for i, rate in enumerate(rates):
            measured.append(run_rate(base, args, rate, tok, cost, traces, i == 0, kv_url=d_url))
            print(f"rate {rate:g}: {measured[-1][1]['start_utc']}-{measured[-1][1]['end_utc']}", flush=True)
            if not args.single_calibration:
                passes.append(run_pass(base, args, cal_rate, tok, traces))
                print(f"calibration pass {len(passes) - 1}: {passes[-1]['start_utc']}-{passes[-1]['end_utc']}",
                      flush=True)
    return measured, transfer, hop, passes


def calibration_rate(args, rates: list[float], tok) -> float:
    """The calibration passes' rate: --served-calibration-rate, or the highest measured rate; `match`: the highest
    rate times the measured requests' mean prompt length over the passes' (same workload, their seeds), so that the
    passes carry the measured rate's prompt tokens per second (the producer's load) rather than its requests per
    second."""
    top = max(rates)
    if args.served_calibration_rate is None:
        return top
    if args.served_calibration_rate != "match":
        try:
            rate = float(args.served_calibration_rate)
        except ValueError:
            raise ConfigError(f"--served-calibration-rate: a rate or 'match', not {args.served_calibration_rate!r}")
        if rate <= 0:
            raise ConfigError("--served-calibration-rate must be positive")
        return rate
    mean = lambda n, seed: statistics.fmean(r.prompt_len for r in requests_from_workload(
        args.workload, n, top, seed, chat_overhead=CHAT_TEMPLATE_TOKENS, tokenizer=tok))
    measured, passes = mean(args.num_requests, 0), mean(args.served_calibration_requests, args.served_calibration_seed)
    rate = top * measured / passes
    print(f"calibration passes at {rate:.2f} req/s: the measured requests' prompts average {measured:.0f} tokens, "
          f"the passes' {passes:.0f} ({top:g} req/s x {measured / passes:.3f})", flush=True)
    return rate


def _point(pred: dict) -> dict:
    return {"predicted": pred["predicted_served_calibration"], "error": pred["error_served_calibration"]}


def drift_corrected(first: dict, speeds: dict[str, float]) -> dict:
    """The first pass's calibration (its fits' shapes, path, gaps and scatter) with each side's cost model scaled
    by `speeds[side]`: the drift between calibration passes taken out and nothing else changed."""
    return {**first, "prefill": first["prefill"].scaled(speeds["prefill"]),
            "decode": first["decode"].scaled(speeds["decode"])}


def interleaved_row(i: int, reqs, meas: dict, err: dict, spec: FleetSpec, rate: float, passes: list[dict],
                    alone: list[dict], summ: list[dict], cost: CostModel, ingress_s: float, traces: dict[str, Path],
                    extra: dict, replicates: int) -> dict:
    """Rate i predicted from the calibration passes just before (i) and just after (i + 1) it: each alone; the
    first pass's calibration scaled by the mean speed of the two against it (drift-corrected: the single
    calibration with only the drift between passes taken out); both fitted together (bracketing: every figure
    of the calibration refitted to the two passes); and each side's speed during the rate against those fits."""
    brk = calibration_of([passes[i], passes[i + 1]], cost, ingress_s)
    b = served_prediction(reqs, meas, err, spec, brk, rate, replicates)
    speeds = {side: statistics.fmean(summ[k][f"{side}_vs_first_pass"] / summ[0][f"{side}_vs_first_pass"]
                                     for k in (i, i + 1)) for side in ("prefill", "decode")}
    dc = drift_corrected(alone[0], speeds)
    d = served_prediction(reqs, meas, err, spec, dc, rate, replicates)
    t0, t1 = extra["t0"], extra["t1"]
    return {"passes": [i, i + 1], "drift_speeds": speeds,
            "drift_corrected": {k: v for k, v in d.items() if k != "predicted_requests_served_calibration"},
            "preceding": _point(served_prediction(reqs, meas, err, spec, alone[i], rate, 0)),
            "following": _point(served_prediction(reqs, meas, err, spec, alone[i + 1], rate, 0)),
            "bracketing": {k: v for k, v in b.items() if k != "predicted_requests_served_calibration"},
            "bracketing_calibration": cal_json(brk),
            "run_speed": {"vs_first_pass": run_speed(traces, t0, t1, alone[0]),
                          "vs_preceding": run_speed(traces, t0, t1, alone[i]),
                          "vs_following": run_speed(traces, t0, t1, alone[i + 1]),
                          "vs_drift_corrected": run_speed(traces, t0, t1, dc),
                          "vs_bracketing": run_speed(traces, t0, t1, brk)}}


def cal_json(cal: dict) -> dict:
    return {**{k: v for k, v in cal.items() if k not in ("prefill", "decode", "path", "prefill_spread",
                                                         "decode_spread")},
            "prefill_cost_model": cal["prefill"].to_dict(), "decode_cost_model": cal["decode"].to_dict(),
            "path": None if cal["path"] is None else asdict(cal["path"]),
            "prefill_spread": spread_summary(cal["prefill_spread"]), "decode_spread": spread_summary(cal["decode_spread"])}


def _fig(m: dict, p: dict, e: dict) -> str:
    return (f"{m['ttft_p50_ms']:>8.0f} / {p['ttft_p50_ms']:>6.0f} ({e['ttft_p50_ms']:+.0%}) | "
            f"{m['tpot_p50_ms']:>8.1f} / {p['tpot_p50_ms']:>6.1f} ({e['tpot_p50_ms']:+.0%}) | "
            f"{m['output_tok_s']:>8.1f} / {p['output_tok_s']:>6.1f} ({e['output_tok_s']:+.0%})")


def cpu_line(c: dict) -> str:
    return (f"this run's processes {c['ours']:.0%}, other processes {c['others']:.1%}, steal {c['steal']:.1%}, "
            f"idle {c['idle']:.0%} of the cores")


def print_rows(rows: list[dict], spec: FleetSpec, args, drift: dict) -> None:
    print(f"{spec.label}, {args.workload}, {args.num_requests} requests")
    print(f"{'rate':>5} | {'TTFT p50 meas / pred':>27} | {'TPOT p50 meas / pred':>27} | {'out tok/s meas / pred':>27}")
    for r in rows:
        m = r["measured"]
        preds = [("  in-process calibration", r["predicted"], r["error"])]
        if "predicted_served_calibration" in r:
            preds.append(("  served calibration, idle path", r["predicted_served_idle_path"],
                          r["error_served_idle_path"]))
            preds.append(("  served calibration (single pass, before the rates)", r["predicted_served_calibration"],
                          r["error_served_calibration"]))
            band = r["predicted_served_replicates"]
            preds.append(("  single pass, median of runs with its scatter",
                          {k: v["median"] for k, v in band.items()}, r["error_served_replicates"]))
        it = r.get("interleaved")
        if it:
            i, j = it["passes"]
            preds.append((f"  pass {i} (just before)", it["preceding"]["predicted"], it["preceding"]["error"]))
            preds.append((f"  pass {j} (just after)", it["following"]["predicted"], it["following"]["error"]))
            dd = it["drift_corrected"]
            sp = it["drift_speeds"]
            preds.append((f"  pass 0 x the speed of passes {i}+{j} ({sp['prefill']:.3f} / {sp['decode']:.3f}: "
                          f"drift-corrected)", dd["predicted_served_calibration"], dd["error_served_calibration"]))
            preds.append(("  drift-corrected, median of runs with its scatter",
                          {k: v["median"] for k, v in dd["predicted_served_replicates"].items()},
                          dd["error_served_replicates"]))
            bb = it["bracketing"]
            preds.append((f"  passes {i}+{j} fitted together (bracketing)", bb["predicted_served_calibration"],
                          bb["error_served_calibration"]))
            preds.append(("  bracketing, median of runs with its scatter",
                          {k: v["median"] for k, v in bb["predicted_served_replicates"].items()},
                          bb["error_served_replicates"]))
        preds.append(("  at run speed", r["predicted_at_run_speed"], r["error_at_run_speed"]))
        for label, p, e in preds:
            print(f"{r['rate']:>5g} | {_fig(m, p, e)}{label}")
        for name, rr in (("single pass", r), ("drift-corrected", (it or {}).get("drift_corrected", {})),
                         ("bracketing", (it or {}).get("bracketing", {}))):
            if "predicted_served_replicates" in rr:
                print(f"      10-90% band ({name}): " + ", ".join(
                    f"{k} {v['p10']:.1f}-{v['p90']:.1f}{'' if rr['measured_within_band'][k] else ' (measured outside)'}"
                    for k, v in rr["predicted_served_replicates"].items()))
        if r.get("cpu"):
            print("      CPU time meanwhile: " + cpu_line(r["cpu"]))
        print(f"      run speed vs in-process calibration (step time measured / predicted): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["run_speed_vs_calibration"].items() if v))
        if it:
            print("      run speed vs served fits (producer / consumer): " + ", ".join(
                f"{k.removeprefix('vs_')} {v['prefill'] or 0:.3f} / {v['decode'] or 0:.3f}"
                for k, v in it["run_speed"].items()))
    if drift:
        print("calibration passes, each side's speed against pass 0's fit (producer / consumer): " + ", ".join(
            f"pass {k} {p['start_utc']} {p['prefill_vs_first_pass']:.3f} / {p['decode_vs_first_pass']:.3f}"
            for k, p in enumerate(drift["passes"])))
        for k, p in enumerate(drift["passes"]):
            if p.get("cpu"):
                print(f"      pass {k}: CPU time meanwhile: " + cpu_line(p["cpu"]))
        print(f"drift between passes (max / min - 1): producer {drift['prefill']:.1%}, consumer {drift['decode']:.1%}")


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
    ap.add_argument("--served-calibration-rate", default=None,
                    help="disagg: rate of the served calibration passes (default: the highest --rate); 'match': "
                         "the highest rate scaled so that the passes carry its prompt tokens per second (where the producer "
                         "keeps up at that rate: an overloaded producer batches a pass into too few steps to fit)")
    ap.add_argument("--served-calibration-requests", type=int, default=60)
    ap.add_argument("--served-calibration-seed", type=int, default=1,
                    help="disagg: the calibration passes' requests (the measured rates use seed 0)")
    ap.add_argument("--single-calibration", action="store_true",
                    help="disagg: one calibration pass before the rates only (default: also one after each rate)")
    ap.add_argument("--trace-dir", default=None, help="keep the instances' step traces here (default: a temporary dir)")
    ap.add_argument("--replicates", type=int, default=40,
                    help="disagg: simulated runs with the served step scatter (the prediction's median and band)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tok = default_tokenizer()
    load0 = os.getloadavg()[0]
    cost = CostModel.load(args.calibration) if args.calibration else calibrate_default(args.save_calibration, 1)
    ref = reference_times(cost)
    print(f"one-thread cost model: decode step {ref['decode_ms']:.1f} ms, 512-token prefill "
          f"{ref['prefill_512_ms']:.0f} ms", flush=True)
    rates = parse_rates(args.rate)
    transfer = hop = served = None
    passes: list[dict] = []
    alone: list[dict] = []
    tmp = tempfile.TemporaryDirectory()
    trace_dir = Path(args.trace_dir or tmp.name)
    trace_dir.mkdir(parents=True, exist_ok=True)
    if args.mode == "colocated":
        traces = {"all": trace_dir / "steps.jsonl"}  # both engine processes append to it
        cmd = serve_cmd("fcfs", 10000, 1000, [*COMMON, "--step-trace", str(traces["all"]), "--data-parallel-size", "2",
                                              "--data-parallel-policy", args.policy])
        with server_process(cmd, log_path="/tmp/fleet_validate.log", env=ENV) as base:
            measured = [run_rate(base, args, rate, tok, cost, traces, i == 0) for i, rate in enumerate(rates)]
        spec = FleetSpec(instances=2, router_policy=args.policy)
    else:
        traces = {k: trace_dir / f"{k}.jsonl" for k in ("prefill", "decode")}
        measured, transfer, hop, passes = run_disagg(args, rates, tok, cost, traces)
        alone = [calibration_of([p], cost, hop["ingress_s"]) for p in passes]  # alone[0]: the single calibration
        served = alone[0]
        spec = FleetSpec(instances=2, prefill_instances=1, router_policy=args.policy,
                         transfer_s_per_block=max(0.0, transfer["per_block_s"]),
                         transfer_s_per_pull=max(0.0, transfer.get("fixed_s", 0.0)), hop_s=hop["hop_s"],
                         ingress_s=hop["ingress_s"])
    t_sim = time.time()
    drift = {}
    if passes:
        summ = [pass_summary(p, cost, alone[0]) for p in passes]
        drift = {"passes": summ, **{side: speed_drift([p[f"{side}_vs_first_pass"] for p in summ])
                                    for side in ("prefill", "decode")}}
    rows = []
    for i, (m, extra) in enumerate(measured):
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
        row_served = {} if served is None else served_prediction(reqs, meas, err, spec, served, m.rate, args.replicates)
        if len(passes) > i + 1:
            row_served["interleaved"] = interleaved_row(i, reqs, meas, err, spec, m.rate, passes, alone, summ,
                                                        cost, hop["ingress_s"], traces, extra, args.replicates)
        rows.append({"rate": m.rate, "measured": meas, "predicted": pred, "error": err,
                     "within_20pct": all(abs(e) <= 0.2 for e in err.values()), "predicted_at_run_speed": at_speed,
                     "error_at_run_speed": err_speed, **row_served, **extra,
                     # per request, in arrival order: [prompt tokens, output tokens, TTFT s, TPOT s, sent at s]
                     "measured_requests": [[r.prompt_len, r.output_tokens, r.ttft_s, r.tpot_s, r.scheduled_s]
                                           for r in sorted(m.records, key=lambda r: r.scheduled_s)],
                     "predicted_requests": [list(x[:4]) for x in sim.records]})
    print(f"predictions took {time.time() - t_sim:.0f} s", flush=True)
    print_rows(rows, spec, args, drift)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "mode": args.mode, "fleet": spec.label, "workload": args.workload, "num_requests": args.num_requests,
            "policy": args.policy, "loadavg_before": load0, "loadavg_after": os.getloadavg()[0],
            "cost_model": cost.to_dict(), "calibration": ref, "transfer": transfer, "hop": hop,
            "served_calibration": None if served is None else {
                **{k: v for k, v in drift["passes"][0].items() if k not in ("t0", "t1", "requests")}, **cal_json(served),
                "replicates": args.replicates},
            "calibration_passes": drift,
            "spec": {"transfer_s_per_block": spec.transfer_s_per_block, "transfer_s_per_pull": spec.transfer_s_per_pull,
                     "hop_s": spec.hop_s, "ingress_s": spec.ingress_s}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
