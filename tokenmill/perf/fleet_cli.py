"""`tokenmill plan --instances N`: goodput per instance of a fleet, colocated and every prefill/decode split
(or the one given by --prefill-instances), with the router policy and the KV transfer cost per block."""
from __future__ import annotations

import argparse
from typing import Any

from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import CostModel
from tokenmill.perf.fleet import FLEET_POLICIES, FleetSpec, max_goodput_rate, per_type_rates, simulate_fleet
from tokenmill.perf.simulator import SimConfig, requests_from_workload


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet (several instances behind a router)")
    g.add_argument("--instances", type=int, default=1, help="engine instances in the fleet (> 1: plan the fleet)")
    g.add_argument("--prefill-instances", type=int, default=None,
                   help="of those, prefill instances (disaggregated; 0: colocated; default: try every split)")
    g.add_argument("--router-policy", default="least-load", choices=list(FLEET_POLICIES),
                   help="how requests are spread over the (prefill) instances")
    g.add_argument("--transfer-ms-per-block", type=float, default=None,
                   help="KV transfer prefill -> decode per block (default: the block's bytes at --transfer-gbps)")
    g.add_argument("--transfer-ms-per-pull", type=float, default=0.0,
                   help="KV transfer: fixed cost of each pull (connection, header), on top of the per-block cost")
    g.add_argument("--hop-ms", type=float, default=0.0,
                   help="disaggregated: prefill answer -> decode instance (the router's second hop)")
    g.add_argument("--hop-ms-per-request", type=float, default=0.0,
                   help="disaggregated: added to --hop-ms per other prompt the same prefill step finished (a burst "
                        "reaches the decode instance one request after another)")
    g.add_argument("--ingress-ms", type=float, default=0.0,
                   help="client's send -> the first instance's scheduler (HTTP, chat template, tokenizing, router)")
    g.add_argument("--return-ms", type=float, default=0.0,
                   help="disaggregated: the decode instance's first token -> the client")
    g.add_argument("--step-gap-ms", type=float, default=0.0,
                   help="the engine loop's time between two steps of a prefill or colocated instance")
    g.add_argument("--decode-step-gap-ms", type=float, default=0.0,
                   help="the same for a decode instance (bench/fleet_validate.py fits these five from a served "
                        "pass's step traces: tokenmill/perf/served_path.py)")
    g.add_argument("--fleet-method", default="simulate", choices=["simulate", "per-type"],
                   help="simulate: the whole fleet at each split (exact, slow for large N); per-type: the goodput "
                        "rate of one colocated, one prefill and one decode instance, combined per split (DistServe)")
    g.add_argument("--transfer-gbps", type=float, default=25.0,
                   help="link bandwidth in GB/s for the default transfer cost (25: 200 Gb/s RDMA)")


def plan_fleet(args: argparse.Namespace, cost: CostModel, cfg: SimConfig, out: dict[str, Any]) -> None:
    n = args.instances
    if args.prefill_instances is not None and not 0 <= args.prefill_instances < n:
        raise ConfigError(f"--prefill-instances must be in [0, {n - 1}], got {args.prefill_instances}")
    if args.transfer_ms_per_block is not None and not args.transfer_ms_per_block >= 0:
        raise ConfigError(f"--transfer-ms-per-block must be >= 0, got {args.transfer_ms_per_block}")
    if not args.transfer_gbps > 0:
        raise ConfigError(f"--transfer-gbps must be positive, got {args.transfer_gbps}")
    block_bytes = cost.spec.kv_bytes_per_token * cfg.block_size
    per_block_s = (args.transfer_ms_per_block / 1e3 if args.transfer_ms_per_block is not None
                   else block_bytes / (args.transfer_gbps * 1e9))
    path_ms = {"hop_s_per_request": ("--hop-ms-per-request", args.hop_ms_per_request),
               "ingress_s": ("--ingress-ms", args.ingress_ms), "return_s": ("--return-ms", args.return_ms),
               "step_gap_s": ("--step-gap-ms", args.step_gap_ms),
               "decode_step_gap_s": ("--decode-step-gap-ms", args.decode_step_gap_ms)}
    for flag, v in (("--transfer-ms-per-pull", args.transfer_ms_per_pull), ("--hop-ms", args.hop_ms),
                    *path_ms.values()):
        if not v >= 0:
            raise ConfigError(f"{flag} must be >= 0, got {v}")
    pull_s, hop_s = args.transfer_ms_per_pull / 1e3, args.hop_ms / 1e3
    path = {field: v / 1e3 for field, (_, v) in path_ms.items()}  # the served path's fixed latencies, seconds
    splits = [args.prefill_instances] if args.prefill_instances is not None else list(range(n))

    def make(rate: float):
        return requests_from_workload(args.workload, args.num_requests, rate, args.seed,
                                      chat_overhead=args.chat_overhead)

    slo = f"TTFT <= {args.slo_ttft} ms, TPOT <= {args.slo_tpot} ms" if (args.slo_ttft or args.slo_tpot) else "no SLO"
    how = ("per-type rates (DistServe's method: each instance kind simulated alone)" if args.fleet_method == "per-type"
           else "the whole fleet simulated")
    print(f"fleet of {n} instances, workload {args.workload}, {slo}, router {args.router_policy}, KV transfer "
          f"{per_block_s * 1e3:.3f} ms per block of {block_bytes / 1024:.0f} KiB; {how}, {args.num_requests} "
          "simulated requests per run:")
    rows = []
    if args.fleet_method == "per-type":
        if not (args.slo_ttft and args.slo_tpot):
            raise ConfigError("--fleet-method per-type needs both --slo-ttft and --slo-tpot")
        rates = per_type_rates(make, cost, cfg, args.router_policy, per_block_s, args.slo_ttft, args.slo_tpot,
                               transfer_s_per_pull=pull_s, hop_s=hop_s, path=path)
        print(f"  one instance alone: colocated {rates.colocated:.3f} req/s, prefill {rates.prefill:.3f} req/s "
              f"(TTFT), decode {rates.decode:.3f} req/s (TPOT)")
        print(f"  {'split':>14} {'goodput/inst':>12} {'fleet req/s':>11}")
        for p in splits:
            s = FleetSpec(n, p, args.router_policy, per_block_s, pull_s, hop_s, **path)
            per = rates.per_instance(n, p)
            rows.append({"split": s.label, "prefill_instances": p, "goodput_per_instance": per, "rate": per * n})
            print(f"  {s.label:>14} {per:>12.3f} {per * n:>11.3f}")
        out["fleet_per_type_rates"] = {"colocated": rates.colocated, "prefill": rates.prefill, "decode": rates.decode}
    else:
        print(f"  {'split':>14} {'goodput/inst':>12} {'fleet req/s':>11} {'TTFT p50':>9} {'TPOT p50':>9} {'attain':>7}")
        for p in splits:
            s = FleetSpec(n, p, args.router_policy, per_block_s, pull_s, hop_s, **path)
            if args.rate is not None:
                rate = args.rate
            elif args.slo_ttft or args.slo_tpot:
                rate = max_goodput_rate(make, cost, cfg, s, args.slo_ttft, args.slo_tpot)
            else:
                raise ConfigError("fleet planning needs --slo-ttft / --slo-tpot (goodput) or a --rate")
            res = simulate_fleet(make(rate or 0.1), cost, cfg, s, args.slo_ttft, args.slo_tpot, rate).summary()
            per = (rate if args.rate is None else res["goodput"]) / n
            rows.append({"split": s.label, "prefill_instances": s.prefill_instances, "goodput_per_instance": per,
                         "rate": rate, **{k: res[k] for k in ("slo_attainment", "ttft_ms", "tpot_ms", "goodput")}})
            print(f"  {s.label:>14} {per:>12.3f} {rate:>11.3f} {_ms(res['ttft_ms']['p50']):>9} "
                  f"{_ms(res['tpot_ms']['p50']):>9} {res['slo_attainment']:>7.2f}")
    best = max(rows, key=lambda r: r["goodput_per_instance"])
    colo = next((r for r in rows if r["prefill_instances"] == 0), None)
    line = f"best: {best['split']} ({best['goodput_per_instance']:.3f} req/s per instance"
    if colo is not None and best is not colo and colo["goodput_per_instance"] > 0:
        line += f", {best['goodput_per_instance'] / colo['goodput_per_instance']:.2f}x colocated"
    print(line + "; predicted by simulation)")
    out["fleet"] = {"instances": n, "router_policy": args.router_policy, "transfer_s_per_block": per_block_s,
                    "transfer_s_per_pull": pull_s, "hop_s": hop_s, **path,
                    "splits": rows, "best": best["split"]}


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"
