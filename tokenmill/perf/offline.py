"""`tokenmill bench throughput` and `tokenmill bench latency`: the engine in-process, JSON out.

throughput: submit all prompts at once (a workload spec or fixed IN/OUT sizes), run to completion,
report requests/s and tokens/s. latency: per batch size, the time of the prefill step(s), of each
decode step, and of the whole batch (end to end), over a few iterations after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any, Optional

from tokenmill.errors import ConfigError


def _prompts(llm: Any, workload: Optional[str], input_len: int, output_len: int, num: int,
             seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request: from a workload spec, or random ids of fixed size."""
    tok = llm.get_tokenizer()
    if workload:
        from tokenmill.bench.workloads import get_workload

        convs = get_workload(workload, tokenizer=tok, seed=seed).generate(num, seed)
        out = []
        for c in convs:
            t = c.turns[0]
            text = t.prompt if t.prompt is not None else "\n".join(m["content"] for m in t.messages or [])
            out.append((tok.encode(text, add_special_tokens=False) or [0], t.max_tokens))
        return out
    rng = random.Random(seed)
    vocab = _vocab(llm)
    return [([rng.randrange(vocab // 8, vocab - vocab // 8) for _ in range(input_len)], output_len) for _ in range(num)]


def run_throughput(llm_args: dict[str, Any], workload: Optional[str] = None, input_len: int = 256,
                   output_len: int = 64, num_prompts: int = 64, seed: int = 0, llm: Any = None) -> dict[str, Any]:
    """Offline throughput: all prompts at once, ignore_eos; returns the results dict."""
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ConfigError("num_prompts, input_len and output_len must be positive")
    llm = llm or LLM(**llm_args)
    reqs = _prompts(llm, workload, input_len, output_len, num_prompts, seed)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in reqs], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_in = sum(len(ids) for ids, _ in reqs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"benchmark": "throughput", "workload": workload or f"fixed:{input_len}:{output_len}",
            "num_prompts": num_prompts, "elapsed_s": dt, "requests_per_s": num_prompts / dt,
            "input_tokens": n_in, "output_tokens": n_out, "output_tokens_per_s": n_out / dt,
            "total_tokens_per_s": (n_in + n_out) / dt, "engine_args": _jsonable(llm_args)}


def run_latency(llm_args: dict[str, Any], input_len: int = 128, output_len: int = 32,
                batch_sizes: tuple[int, ...] = (1, 8), num_iters: int = 3, num_warmup: int = 1, seed: int = 0,
                llm: Any = None) -> dict[str, Any]:
    """Batch-1 and fixed-batch step timings: prefill time, decode step time, end-to-end batch latency."""
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    if input_len < 1 or output_len < 2 or num_iters < 1 or any(b < 1 for b in batch_sizes):
        raise ConfigError("input_len, num_iters and batch sizes must be positive and output_len at least 2")
    llm = llm or LLM(**llm_args)
    engine = llm.engine
    rng = random.Random(seed)
    vocab = _vocab(llm)
    results = []
    rid = 0
    for bs in batch_sizes:
        prefill, decode, e2e = [], [], []
        for it in range(num_warmup + num_iters):
            params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
            for _ in range(bs):
                ids = [rng.randrange(vocab // 8, vocab - vocab // 8) for _ in range(input_len)]
                engine.add_request(f"lat{rid}", None, params, prompt_token_ids=ids)
                rid += 1
            t_start = time.perf_counter()
            first_done: Optional[float] = None
            started: set[str] = set()
            steps = []
            while engine.has_unfinished_requests():
                t0 = time.perf_counter()
                outs = engine.step()
                t1 = time.perf_counter()
                if first_done is None:
                    started.update(o.request_id for o in outs if o.outputs[0].token_ids)
                    if len(started) == bs:
                        first_done = t1
                elif outs:
                    steps.append(t1 - t0)
            if it >= num_warmup:
                e2e.append(time.perf_counter() - t_start)
                prefill.append((first_done or time.perf_counter()) - t_start)
                decode.extend(steps)
        results.append({"batch_size": bs, "input_len": input_len, "output_len": output_len,
                        "prefill_ms": _ms_stats(prefill), "decode_step_ms": _ms_stats(decode),
                        "e2e_ms": _ms_stats(e2e),
                        "decode_tokens_per_s": bs / statistics.median(decode) if decode else None})
    return {"benchmark": "latency", "results": results, "engine_args": _jsonable(llm_args)}


def _vocab(llm: Any) -> int:
    """Token ids valid for both the tokenizer and the model."""
    return min(len(llm.get_tokenizer()), int(llm.engine.core.runner.hf_config.vocab_size))


def _ms_stats(xs: list[float]) -> dict[str, Optional[float]]:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "n": 0}
    v = sorted(x * 1e3 for x in xs)
    return {"mean": sum(v) / len(v), "p50": statistics.median(v), "p90": v[min(len(v) - 1, int(0.9 * len(v)))],
            "n": len(v)}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))}


def add_offline_args(bench_subparsers: Any) -> None:
    """Register `throughput` and `latency` on the `tokenmill bench` subparsers (func: main_offline)."""
    from tokenmill.config import add_config_args

    p = bench_subparsers.add_parser("throughput", help="offline throughput (engine in-process)",
                                    description="Offline throughput: all prompts at once, engine in-process.")
    p.add_argument("--workload", default=None, help="a workload spec (default: fixed sizes below)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--out", default=None, help="also write the JSON here")
    add_config_args(p)
    p = bench_subparsers.add_parser("latency", help="offline step latency (engine in-process)",
                                    description="Batch-1 and fixed-batch step timings, engine in-process.")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="the fixed batch (batch 1 is always measured)")
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--num-warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the JSON here")
    add_config_args(p)


def main_offline(args: argparse.Namespace) -> int:
    """Run `bench throughput` / `bench latency` from parsed args; prints JSON. TokenmillError propagates."""
    from tokenmill.config import config_from_args

    engine_args = config_from_args(args).to_kwargs()
    if args.bench_command == "throughput":
        res = run_throughput(engine_args, args.workload, args.input_len, args.output_len, args.num_prompts,
                             seed=getattr(args, "seed", 0) or 0)
    else:
        sizes = (1,) if args.batch_size == 1 else (1, args.batch_size)
        res = run_latency(engine_args, args.input_len, args.output_len, sizes, args.num_iters, args.num_warmup)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.flush()
    return 0
