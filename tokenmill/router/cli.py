"""`tokenmill router --backend URL [--backend URL ...] [--policy round-robin|least-load|prefix]`, or
`tokenmill router --prefill URL [...] --decode URL [...]` over disaggregated prefill / decode instances."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from tokenmill.errors import TokenmillError
from tokenmill.loop import run as run_loop
from tokenmill.router.app import RouterConfig, serve_router


def cmd_router(args: argparse.Namespace) -> int:
    cfg = RouterConfig(**{f.name: getattr(args, f.name) for f in fields(RouterConfig)})
    try:
        run_loop(serve_router(cfg))
    except TokenmillError as exc:
        print(f"tokenmill router: error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_router_args(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("router", help="HTTP router over tokenmill servers (replicas)",
                              description="Route OpenAI-API requests over several `tokenmill serve` backends (replicas), "
                                          "or over prefill and decode instances (--prefill / --decode).")
    for f in fields(RouterConfig):
        flag = "--backend" if f.name == "backends" else "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
        if f.name in ("backends", "prefill", "decode"):  # RouterConfig.validate says which are missing
            kw.update(action="append", metavar="URL")
        elif "choices" in f.metadata:
            kw.update(choices=f.metadata["choices"], default=f.default)
        else:
            kw.update(default=f.default, type=type(f.default) if f.default is not None else str)
        p.add_argument(flag, **kw)
    p.set_defaults(func=cmd_router)
    return p
