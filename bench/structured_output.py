"""Constrained decoding (JSON schemas, xgrammar), in-process on the default model (or --model).

compile      grammar compile time per schema (the 60 schemas of tests/structured/schemas.py), and the cost of a
             cache hit.
ttft         time to first token of one request: unconstrained, constrained with a cached schema, constrained
             with a schema never seen (compiled off the step loop while the request waits).
tpot         TPOT p50 with 16 and 64 concurrent requests, each with its own JSON schema (all kept running to
             max_tokens: arrays with more required items than fit), against the same load unconstrained;
             constrained with jump-forward off (the mask's cost alone) and with the default (draft).
jump         a fixed-key schema, one request at a time: model steps per response and end-to-end latency with
             jump-forward off, tokens and draft (exact), string (xgrammar's forced-string tokenization,
             unverified); whether each mode's greedy tokens equal those of off.

    PYTHONPATH=. python bench/structured_output.py [--parts compile,ttft,tpot,jump] [--concurrency 16,64]
        [--max-tokens 64] [--repeats 5] [--out results.json]
Run it on a quiet machine: every number is a wall-clock time.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

sys.path.insert(0, ".")  # tests/structured/schemas.py

from tests.structured.schemas import SCHEMAS  # noqa: E402
from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402
from tokenmill.structured.grammar import GrammarCache  # noqa: E402

FIXED_KEYS = {"type": "object", "additionalProperties": False, "properties": {
    "customer_name": {"type": "string", "maxLength": 16}, "account_status": {"enum": ["active", "suspended"]},
    "subscription_tier": {"enum": ["free", "premium", "enterprise"]}, "is_verified": {"type": "boolean"},
    "number_of_devices": {"type": "integer", "minimum": 0, "maximum": 9},
    "preferred_language": {"enum": ["english", "french", "german"]}},
    "required": ["customer_name", "account_status", "subscription_tier", "is_verified", "number_of_devices",
                 "preferred_language"]}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _prompt(engine: LLMEngine, text: str) -> list[int]:
    return engine.processor.apply_chat_template([{"role": "user", "content": text}])


def _run(engine: LLMEngine, reqs: list[tuple[list[int], SamplingParams]], tag: str) -> dict[str, dict]:
    """Submit all at once, step to the end; per request: submit, first-token and end times, tokens."""
    t0 = time.perf_counter()
    info: dict[str, dict] = {}
    for i, (ids, sp) in enumerate(reqs):
        rid = f"{tag}-{i}"
        engine.add_request(rid, None, sp, prompt_token_ids=ids)
        info[rid] = {"submit": t0, "first": None, "end": None, "tokens": 0}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            r = info[out.request_id]
            n = len(out.outputs[0].token_ids)
            if n and r["first"] is None:
                r["first"] = now
            if out.finished:
                r["end"], r["tokens"], r["finish"] = now, n, out.outputs[0].finish_reason
                r["ids"] = list(out.outputs[0].token_ids)
    return info


def bench_compile(engine: LLMEngine) -> dict:
    cache = GrammarCache(engine.tokenizer, engine.core.structured.manager.vocab_size, engine.eos_token_ids,
                         max_entries=1024)
    cache.get(StructuredOutputsParams(regex="warm")).result()  # the tokenizer info, built once
    times, hits = [], []
    for s in SCHEMAS:
        so = StructuredOutputsParams(json=s)
        t = time.perf_counter()
        cache.get(so).result()
        times.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        cache.get(StructuredOutputsParams(json=s)).result()
        hits.append((time.perf_counter() - t) * 1e6)
    cache.shutdown()
    return {"schemas": len(times), "compile_ms_p50": statistics.median(times), "compile_ms_p90": _pct(times, 0.9),
            "compile_ms_max": max(times), "cache_hit_us_p50": statistics.median(hits)}


def bench_ttft(engine: LLMEngine, repeats: int) -> dict:
    ids = _prompt(engine, "Describe a user account as JSON.")
    cached = StructuredOutputsParams(json=FIXED_KEYS)
    engine.core.structured.manager.validate(cached)  # compiled and cached before timing
    out: dict[str, list[float]] = {"unconstrained": [], "cached_schema": [], "new_schema": []}
    for k in range(repeats):
        new = StructuredOutputsParams(json={**FIXED_KEYS, "description": f"never seen {time.time()} {k}"})
        for name, so in (("unconstrained", None), ("cached_schema", cached), ("new_schema", new)):
            info = _run(engine, [(ids, SamplingParams(temperature=0, max_tokens=1, structured_outputs=so))],
                        f"ttft-{name}-{k}")
            r = next(iter(info.values()))
            out[name].append((r["first"] - r["submit"]) * 1e3)
    return {f"ttft_ms_p50_{k}": statistics.median(v) for k, v in out.items()}


def _long_schema(i: int) -> dict:
    """Request i's own schema; more required items than max_tokens allows, so every request runs to the end."""
    item = {"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 8},
                                             "n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": [f"field_{i}", "n"]}
    return {"type": "object", "properties": {"request": {"const": i},
                                             "records": {"type": "array", "items": item, "minItems": 500}},
            "required": ["request", "records"]}


def bench_tpot(engine: LLMEngine, conc: int, max_tokens: int) -> dict:
    prompts = [_prompt(engine, f"List records number {i} as JSON.") for i in range(conc)]
    schemas = [StructuredOutputsParams(json=_long_schema(i)) for i in range(conc)]
    for so in schemas:
        engine.core.structured.manager.validate(so)
    for so in schemas:
        engine.core.structured.manager.cache.get(so).result()  # compile outside the timing (see ttft)
    res = {}
    mgr = engine.core.structured.manager
    mode0 = mgr.jump_forward_mode
    _run(engine, [(p, SamplingParams(temperature=0, max_tokens=8)) for p in prompts], f"warm-{conc}")
    runs = [("unconstrained", None, mode0), ("constrained_jump_off", True, "off"), ("constrained", True, mode0)]
    for name, constrained, mode in runs:
        mgr.jump_forward_mode = mode
        reqs = [(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                   structured_outputs=so if constrained else None))
                for p, so in zip(prompts, schemas)]
        rows0, secs0 = mgr.num_filled_rows, mgr.fill_seconds
        info = _run(engine, reqs, f"tpot-{conc}-{name}")
        if constrained:
            res[f"fill_us_per_row_{name}"] = (mgr.fill_seconds - secs0) / max(1, mgr.num_filled_rows - rows0) * 1e6
        tpots = [(r["end"] - r["first"]) / (r["tokens"] - 1) * 1e3 for r in info.values() if r["tokens"] > 1]
        res[f"tpot_ms_p50_{name}"] = statistics.median(tpots)
        res[f"finish_{name}"] = sorted({r["finish"] for r in info.values()})
    mgr.jump_forward_mode = mode0
    res["ratio_constrained_jump_off"] = res["tpot_ms_p50_constrained_jump_off"] / res["tpot_ms_p50_unconstrained"]
    res["ratio_constrained"] = res["tpot_ms_p50_constrained"] / res["tpot_ms_p50_unconstrained"]
    return res


def bench_jump(engine: LLMEngine, repeats: int) -> dict:
    mgr = engine.core.structured.manager
    mode0 = mgr.jump_forward_mode
    names = ["Alice", "Bob", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana"]
    prompts = [_prompt(engine, f"Create the account record of {names[k % len(names)]} as JSON.")
               for k in range(repeats)]
    res = {}
    for ws in (True, False):
        so = StructuredOutputsParams(json=FIXED_KEYS, disable_any_whitespace=ws)
        mgr.validate(so)
        texts = {}
        for mode in ("off", "tokens", "draft", "string"):
            mgr.jump_forward_mode = mode
            steps, lat, outs = [], [], []
            for k, p in enumerate(prompts):
                s0 = engine.core.scheduler.num_steps
                info = _run(engine, [(p, SamplingParams(temperature=0, max_tokens=200, structured_outputs=so))],
                            f"jump-{ws}-{mode}-{k}")
                r = next(iter(info.values()))
                steps.append(engine.core.scheduler.num_steps - s0)
                lat.append((r["end"] - r["submit"]) * 1e3)
                outs.append(r["ids"])
            texts[mode] = outs
            tag = f"{'compact' if ws else 'any_ws'}_{mode}"
            res[f"steps_per_response_{tag}"] = statistics.mean(steps)
            res[f"latency_ms_p50_{tag}"] = statistics.median(lat)
        for mode in ("tokens", "draft", "string"):
            tag = "compact" if ws else "any_ws"
            res[f"step_ratio_{tag}_{mode}"] = res[f"steps_per_response_{tag}_off"] / res[f"steps_per_response_{tag}_{mode}"]
            res[f"same_tokens_as_off_{tag}_{mode}"] = texts[mode] == texts["off"]
    mgr.jump_forward_mode = mode0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--parts", default="compile,ttft,tpot,jump")
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gemm-dtype", default="auto", help="float32: greedy tokens independent of step shape")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = EngineConfig.from_kwargs(model=args.model, max_num_seqs=64, num_threads=args.threads,
                                   max_model_len=2048, gemm_dtype=args.gemm_dtype)
    engine = LLMEngine.from_config(cfg)
    parts = args.parts.split(",")
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                    "model": engine.model_name, "gemm_dtype": args.gemm_dtype}
    if "compile" in parts:
        result["compile"] = bench_compile(engine)
    if "ttft" in parts:
        result["ttft"] = bench_ttft(engine, args.repeats)
    if "tpot" in parts:
        result["tpot"] = {c: bench_tpot(engine, int(c), args.max_tokens) for c in args.concurrency.split(",")}
    if "jump" in parts:
        result["jump"] = bench_jump(engine, args.repeats)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
