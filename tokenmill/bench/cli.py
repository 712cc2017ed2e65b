"""`tokenmill bench ...` command line: `serve` (load an OpenAI-compatible server).

`throughput` and `latency` (in-process engine benchmarks) live in tokenmill/perf/offline.py.
Also runnable as `python -m tokenmill.bench serve ...`.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any, Optional

from tokenmill.errors import TokenmillError


_SERVE_EPILOG = """workloads: chat | long-prefill | shared-prefix | multi-turn (each optionally NAME:key=value,...),
  fixed:IN:OUT, or a JSONL file (PATH.jsonl or jsonl:PATH) with one request per line:
  {"prompt": str | "messages": [...], "max_tokens": int, optional "ttft_ms", "tpot_ms", "priority", "user",
  "delay_s", "ignore_eos"}
examples:
  tokenmill bench serve --base-url http://127.0.0.1:8000 --workload chat --rate 1,2,4 --num-requests 200 \\
      --slo-ttft 500 --slo-tpot 50 --out results.json --plot results.png
  tokenmill bench serve --base-url http://127.0.0.1:8000 --workload fixed:512:128 --find-goodput \\
      --slo-ttft 300 --slo-tpot 40 --duration 60"""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Flags of `bench serve`."""
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--workload", default="chat", help="workload spec (see below); default chat")
    p.add_argument("--rate", default="1", help="request rate(s) in req/s, comma separated, 'inf' = all at once; "
                                               "with --find-goodput the first is the starting rate")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate")
    amount.add_argument("--num-requests", type=int, default=None,
                        help="arrivals per rate (default 200, or the size of a JSONL workload)")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="MS", help="time-to-first-token target (ms)")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="MS", help="time-per-output-token target (ms)")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="arrival process")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape: 1 = Poisson, < 1 burstier, > 1 more regular")
    p.add_argument("--find-goodput", action="store_true",
                   help="search the highest rate at which >= 90%% of requests meet both SLOs")
    p.add_argument("--max-rate", type=float, default=1024.0, help="upper bound of the goodput search")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--plot", default=None, help="write a PNG (latency CDFs, goodput vs rate) here")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/v1/chat/completions or /v1/completions")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer path for exact prompt token counts (default ~0.75 words/token)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrivals")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="{serve,throughput,latency}")
    sub.required = True
    serve = sub.add_parser("serve", help="open-loop load against an OpenAI-compatible server",
                           description="Serving benchmark: open-loop streaming requests against any "
                                       "OpenAI-compatible server; TTFT/TPOT/ITL/E2E, SLO attainment, goodput.",
                           epilog=_SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(serve)
    from tokenmill.perf.offline import add_offline_args

    add_offline_args(sub)  # throughput, latency: the engine in-process


def add_bench_args(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` (with its `serve` subcommand) on the top-level `tokenmill` subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks (serve: load an OpenAI-compatible server)",
                                  description="tokenmill benchmarks")
    _add_subcommands(bench)
    bench.set_defaults(func=main_bench)
    return bench


def _load_tokenizer(path: Optional[str]) -> Any:
    if path is None:
        return None
    from tokenmill.bench.types import BenchError

    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot load tokenizer {path!r}: {str(e).splitlines()[0]}") from None


def _run_serve(args: argparse.Namespace) -> int:
    from tokenmill.bench.report import build_results, format_report, plot_results, write_results
    from tokenmill.bench.serve import find_goodput, parse_rates, run_serve_benchmark
    from tokenmill.bench.types import BenchError
    from tokenmill.bench.workloads import get_workload

    rates = parse_rates(args.rate)
    if args.find_goodput and args.slo_ttft is None and args.slo_tpot is None:
        raise BenchError("--find-goodput needs --slo-ttft and/or --slo-tpot")
    workload = get_workload(args.workload, tokenizer=_load_tokenizer(args.tokenizer), seed=args.seed)
    common = dict(duration_s=args.duration, num_requests=args.num_requests, slo_ttft_ms=args.slo_ttft,
                  slo_tpot_ms=args.slo_tpot, arrival=args.arrival, burstiness=args.burstiness,
                  api_key=args.api_key, model=args.model, endpoint=args.endpoint,
                  max_concurrency=args.max_concurrency, seed=args.seed, progress=not args.no_progress)
    goodput = None
    if args.find_goodput:
        goodput = find_goodput(args.base_url, workload, start_rate=rates[0], max_rate=args.max_rate, **common)
        results = sorted(goodput.probes, key=lambda r: r.rate)
    else:
        results = run_serve_benchmark(args.base_url, workload, rates, **common)
    print(format_report(results, goodput))
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    config.update(rates=[r.rate for r in results], workload_info=workload.describe(),
                  started_at=datetime.datetime.now().isoformat(timespec="seconds"))
    if args.out:
        write_results(args.out, build_results(config, results, goodput))
        print(f"results written to {args.out}")
    if args.plot:
        plot_results(results, args.plot, goodput, args.slo_ttft, args.slo_tpot)
        print(f"plot written to {args.plot}")
    return 0


def main_bench(args: argparse.Namespace) -> int:
    """Run `tokenmill bench <command>`; user errors print one line and return exit code 2."""
    try:
        if args.bench_command == "serve":
            return _run_serve(args)
        from tokenmill.perf.offline import main_offline

        return main_offline(args)
    except TokenmillError as e:
        print(f"tokenmill bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenmill bench: interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[list[str]] = None) -> int:
    """Entry of `python -m tokenmill.bench`."""
    parser = argparse.ArgumentParser(prog="python -m tokenmill.bench", description="tokenmill benchmarks")
    _add_subcommands(parser)
    return main_bench(parser.parse_args(argv))
