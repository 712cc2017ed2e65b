"""`tokenmill serve | generate | chat | bench | plan`. User mistakes exit with code 2 and one line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from tokenmill.config import add_config_args, config_from_args
from tokenmill.errors import TokenmillError


def _engine_parser(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed_sample,
                            top_p=args.top_p, top_k=args.top_k)  # bad values fail before the model loads
    cfg = config_from_args(args)
    llm = LLM(**cfg.to_kwargs())
    if args.raw or not llm.get_tokenizer().chat_template:
        outs = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        outs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    print(outs[0].outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, top_p=args.top_p)
    engine = LLMEngine.from_config(config_from_args(args))
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"tokenmill chat on {engine.model_name} (empty line or Ctrl-D to quit)", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line})
        ids = engine.processor.apply_chat_template(history)
        rid = f"chat-{turn}"
        turn += 1
        try:
            engine.add_request(rid, None, params, prompt_token_ids=ids)
        except TokenmillError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        reply = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    delta = out.outputs[0].delta_text
                    reply += delta
                    print(delta, end="", flush=True)
        except KeyboardInterrupt:
            engine.abort_request(rid)
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.server.app import run_server
    from tokenmill.server.config import server_config_from_args

    run_server(config_from_args(args), server_config_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference and serving engine")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    try:
        from tokenmill.server.config import add_server_args

        add_server_args(p)
    except ImportError:  # the server extra is missing
        pass
    _engine_parser(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", dest="seed_sample", type=int, default=None, help="seed of this request's sampling")
    p.add_argument("--raw", action="store_true", help="send the prompt as is (no chat template)")
    add_config_args(p, skip=("seed",))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal (streams tokens)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--system", default=None, help="system message")
    _engine_parser(p)
    p.set_defaults(func=cmd_chat)

    try:
        from tokenmill.bench.cli import add_bench_args

        add_bench_args(sub)
    except ImportError:
        pass
    from tokenmill.finetune.cli import add_finetune_args

    add_finetune_args(sub)
    try:
        from tokenmill.router.cli import add_router_args

        add_router_args(sub)
    except ImportError:
        pass
    try:
        from tokenmill.disagg.proxy import add_proxy_args

        add_proxy_args(sub)
    except ImportError:  # the server extra is missing
        pass
    try:
        from tokenmill.perf.cli import add_plan_args

        add_plan_args(sub)
    except ImportError:
        pass
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from tokenmill.ops.cpu.host import tune_openmp_wait

    tune_openmp_wait(os.environ)  # in-process commands (bench, generate, serve without an engine process) too
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TokenmillError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
