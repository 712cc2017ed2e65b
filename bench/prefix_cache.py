"""Prefix caching on vs off, in-process, on the default model (or --model).

shared-prefix: N requests with one long shared system prompt (~2k tokens) + ~200-token questions,
submitted at once: throughput (requests/s, prompt+generated tokens/s).
multi-turn: conversations whose next turn resends the whole history, one turn at a time:
TTFT of turns after the first.

    PYTHONPATH=. python bench/prefix_cache.py [--dtype float32] [--num-requests 8] [--turns 4] [--turn-len 200]
        [--turn-out-len N]   (the multi-turn workload of `tokenmill bench`: --turn-len 100 --turn-out-len 100)
Prints a table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from tokenmill.bench.workloads import TextSource, get_workload
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import SamplingParams


def _engine(args, caching: bool) -> LLMEngine:
    cfg = EngineConfig.from_kwargs(model=args.model, dtype=args.dtype, enable_prefix_caching=caching,
                                   max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.threads)
    return LLMEngine.from_config(cfg)


def shared_prefix(engine: LLMEngine, n: int, out_len: int, seed: int) -> dict:
    wl = get_workload(f"shared-prefix:num_prefixes=1,prefix_len=2000,question_len=200,out_len={out_len}",
                      tokenizer=engine.tokenizer, seed=seed)
    convs = wl.generate(n, seed)
    prompts = [engine.processor.apply_chat_template(c.turns[0].messages) for c in convs]
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"sp-{i}", None, params, prompt_token_ids=ids)
    gen = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                gen += len(out.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    ptoks = sum(len(p) for p in prompts)
    return {"requests": n, "seconds": dt, "req_per_s": n / dt, "tok_per_s": (ptoks + gen) / dt,
            "mean_prompt_tokens": ptoks / n}


def multi_turn(engine: LLMEngine, turns: int, out_len: int, seed: int, convs: int, turn_len: int = 200) -> dict:
    import random

    text = TextSource(engine.tokenizer)
    rng = random.Random(seed)
    ttfts: list[float] = []
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    for c in range(convs):
        history: list[dict] = [{"role": "system", "content": text.make(300, rng)[0]}]
        for t in range(turns):
            history.append({"role": "user", "content": text.make(turn_len, rng)[0]})
            ids = engine.processor.apply_chat_template(history)
            rid = f"mt-{c}-{t}"
            t0 = time.perf_counter()
            engine.add_request(rid, None, params, prompt_token_ids=ids)
            first = None
            reply = ""
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter() - t0
                    reply = out.outputs[0].text
            if t > 0:
                ttfts.append(first)
            history.append({"role": "assistant", "content": reply})
    return {"later_turn_ttft_p50_s": statistics.median(ttfts), "later_turns": len(ttfts),
            "last_prompt_tokens": len(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--out-len", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-len", type=int, default=200, help="multi-turn: tokens of each user message")
    ap.add_argument("--turn-out-len", type=int, default=None, help="multi-turn: tokens of each reply (default --out-len)")
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
           platform.machine(), "args": vars(args)}
    for caching in (True, False):
        eng = _engine(args, caching)
        key = "on" if caching else "off"
        res[f"shared_prefix_{key}"] = shared_prefix(eng, args.num_requests, args.out_len, args.seed)
        res[f"multi_turn_{key}"] = multi_turn(eng, args.turns, args.turn_out_len or args.out_len, args.seed,
                                              args.conversations, args.turn_len)
        del eng
    sp = res["shared_prefix_on"]["req_per_s"] / res["shared_prefix_off"]["req_per_s"]
    mt = res["multi_turn_off"]["later_turn_ttft_p50_s"] / res["multi_turn_on"]["later_turn_ttft_p50_s"]
    res["shared_prefix_speedup"], res["multi_turn_ttft_speedup"] = sp, mt
    print(f"{'workload':<34}{'caching on':>14}{'caching off':>14}{'ratio':>9}")
    print(f"{'shared-prefix throughput (req/s)':<34}{res['shared_prefix_on']['req_per_s']:>14.3f}"
          f"{res['shared_prefix_off']['req_per_s']:>14.3f}{sp:>8.2f}x")
    print(f"{'multi-turn later-turn TTFT p50 (s)':<34}{res['multi_turn_on']['later_turn_ttft_p50_s']:>14.3f}"
          f"{res['multi_turn_off']['later_turn_ttft_p50_s']:>14.3f}{mt:>8.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
