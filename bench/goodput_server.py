"""`tokenmill serve` with server-wide SLO targets for the slo policy (until SchedulerConfig has the flags).

    PYTHONPATH=. python bench/goodput_server.py --slo-ttft-ms 1000 --slo-tpot-ms 60 -- --policy slo --port 8000

Everything after `--` is passed to `tokenmill serve`. The targets are set on the scheduler config as
`slo_ttft_ms` / `slo_tpot_ms`, which tokenmill.core.policy.make_policy_for_config reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.cli import build_parser  # noqa: E402
from tokenmill.config import config_from_args  # noqa: E402


def main(argv: list[str]) -> int:
    if "--" in argv:
        i = argv.index("--")
        own, serve = argv[:i], argv[i + 1:]
    else:
        own, serve = argv, []
    p = argparse.ArgumentParser(prog="goodput_server")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    mine = p.parse_args(own)
    args = build_parser().parse_args(["serve", *serve])
    cfg = config_from_args(args)
    if not hasattr(cfg.scheduler, "slo_ttft_ms") or cfg.scheduler.slo_ttft_ms is None:
        cfg.scheduler.slo_ttft_ms = mine.slo_ttft_ms
    if not hasattr(cfg.scheduler, "slo_tpot_ms") or cfg.scheduler.slo_tpot_ms is None:
        cfg.scheduler.slo_tpot_ms = mine.slo_tpot_ms
    from tokenmill.server.app import run_server
    from tokenmill.server.config import server_config_from_args

    run_server(cfg, server_config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
