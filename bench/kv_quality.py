"""KV-cache quality: perplexity of a public-domain text with each kv_cache_dtype.

Runs the real engine path: LLM.generate(SamplingParams(prompt_logprobs=1, max_tokens=1)) on the text
(tokenmill/bench/data/pride_and_prejudice_ch1_2.txt, cut into windows of --window tokens), once per
kv_cache_dtype. Prints the dtype each setting resolved to, perplexity, its delta vs the first --dtypes entry
(float32: exact K/V), max / mean |logprob error| of the text's tokens vs it, top-1 agreement vs it, and the
KV blocks the same --kv-cache-memory gives.

    PYTHONPATH=. python bench/kv_quality.py                      # default model (SmolLM2-135M GGUF)
    PYTHONPATH=. python bench/kv_quality.py --window 1024 --dtypes float32 bfloat16
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time
from datetime import date

import tokenmill
from tokenmill import LLM, SamplingParams

TEXT = os.path.join(os.path.dirname(tokenmill.__file__), "bench", "data", "pride_and_prejudice_ch1_2.txt")


def make_llm(model, kv_dtype: str, args) -> LLM:
    return LLM(model, kv_cache_dtype=kv_dtype, kv_cache_memory=args.kv_cache_memory, max_model_len=args.window + 1,
               enable_prefix_caching=False, dtype=args.dtype, gemm_dtype=args.gemm_dtype)


def run_dtype(llm: LLM, windows: list[list[int]]) -> dict:
    t0 = time.perf_counter()
    runner = llm.engine.core.runner
    blocks, per_block, resolved = runner.num_blocks, runner.kv_bytes_per_block(), runner.kv_cache_dtype
    sp = SamplingParams(prompt_logprobs=1, max_tokens=1, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], sp, use_tqdm=False)
    lps, top1 = [], []
    for o in outs:
        for lp in o.prompt_logprobs[1:]:
            lps.append(lp.logprob)
            top1.append(lp.top[0][0] if lp.top else None)
    return {"lps": lps, "top1": top1, "blocks": blocks, "bytes_per_block": per_block, "resolved": resolved,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the bundled SmolLM2 GGUF)")
    ap.add_argument("--dtype", default="auto", help="model dtype (auto = float32 on CPU)")
    ap.add_argument("--gemm-dtype", default="auto",
                    help="packed GGUF weights' large GEMMs (auto = bfloat16 on AMX / AVX512-BF16 CPUs, where long "
                         "prefill chunks also attend in bf16 SDPA over bf16-rounded K/V whatever the cache dtype: "
                         "use float32 to see the KV dtype's own effect on prompt scoring)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "auto", "bfloat16", "fp8", "int8"],
                    help="kv_cache_dtype settings; the first is the baseline")
    ap.add_argument("--window", type=int, default=2048, help="tokens per scored window")
    ap.add_argument("--kv-cache-memory", type=float, default=0.25, help="GiB for the KV cache (block counts)")
    args = ap.parse_args()

    text = open(TEXT, encoding="utf-8").read()
    llms = {d: None for d in args.dtypes}
    llms[args.dtypes[0]] = make_llm(args.model, args.dtypes[0], args)
    ids = llms[args.dtypes[0]].get_tokenizer().encode(text)
    windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
    windows = [w for w in windows if len(w) > 1]
    print(f"text: {os.path.basename(TEXT)}, {len(ids)} tokens in {len(windows)} window(s) of <= {args.window}")

    res = {}
    for d in args.dtypes:
        llm = llms[d] if llms[d] is not None else make_llm(args.model, d, args)
        res[d] = run_dtype(llm, windows)
        llms[d] = None
        del llm
    base = res[args.dtypes[0]]
    print(f"baseline: {args.dtypes[0]}")
    print(f"{'kv dtype':<18} {'ppl':>9} {'d ppl %':>8} {'max|dlp|':>9} {'mean|dlp|':>10} {'top1 agree':>10} "
          f"{'B/block':>9} {'blocks':>8} {'x blocks':>8} {'s':>6}")
    bppl = math.exp(-sum(base["lps"]) / len(base["lps"]))
    for d, r in res.items():
        ppl = math.exp(-sum(r["lps"]) / len(r["lps"]))
        errs = [abs(a - b) for a, b in zip(r["lps"], base["lps"])]
        agree = sum(a == b for a, b in zip(r["top1"], base["top1"])) / len(errs)
        ratio = r["blocks"] / base["blocks"] if r["blocks"] and base["blocks"] else float("nan")
        name = f"{d} ({r['resolved']})" if d == "auto" else d
        print(f"{name:<18} {ppl:>9.4f} {100 * (ppl / bppl - 1):>8.3f} {max(errs):>9.4f} {sum(errs) / len(errs):>10.5f} "
              f"{agree:>10.4f} {r['bytes_per_block'] or 0:>9} {r['blocks'] or 0:>8} {ratio:>8.3f} {r['seconds']:>6.1f}")
    print(f"# {date.today()} {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"kv_cache_memory={args.kv_cache_memory} GiB, model dtype={args.dtype}, gemm dtype={args.gemm_dtype}")


if __name__ == "__main__":
    main()
