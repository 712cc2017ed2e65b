"""tokenmill on the Llama-3-8B shape (random weights, bf16): start to ready, batch-1 decode, offline throughput,
32k-context decode, FP8 KV against bf16 KV, prefix caching on and off. Each against its roofline or its
counterpart; the engine arguments of every run are built by the *_args functions (checked on the CPU)."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from bench.gpu_suite.common import (HF_8B_ANCHORS, Ctx, Step, build_llm, decode_timing, engine_facts,
                                    generate_throughput, graph_replays, kv_cache_bytes, load_config, model_folder,
                                    num, random_prompts, release, row, shape_of)
from bench.gpu_suite.sizes import Sizes


# ---------------------------------------------------------------------------------------------------
# engine arguments of each run
# ---------------------------------------------------------------------------------------------------


def llama8b_args(sz: Sizes) -> dict[str, Any]:
    """One engine for batch-1 decode and the offline run: every offline request resident at once."""
    return dict(max_model_len=sz.offline_max_model_len, max_num_seqs=sz.offline_max_seqs,
                max_num_batched_tokens=sz.max_batched_tokens)


def long_args(sz: Sizes) -> dict[str, Any]:
    return dict(max_model_len=sz.long_max_model_len, max_num_seqs=1, max_num_batched_tokens=sz.max_batched_tokens)


def long_config(cfg: dict[str, Any], sz: Sizes) -> dict[str, Any]:
    """The 8B config with max_position_embeddings raised to the 32k run's length (Llama-3 ships 8192)."""
    return {**cfg, "max_position_embeddings": max(int(cfg["max_position_embeddings"]), sz.long_max_model_len)}


def fp8_args(sz: Sizes, kind: str, kv_gib: float) -> dict[str, Any]:
    """The same KV memory for either dtype; max_num_seqs high enough that memory, not it, limits the batch."""
    return dict(kv_cache_dtype=kind, kv_cache_memory=kv_gib, max_model_len=sz.fp8_max_model_len,
                max_num_seqs=min(256, sz.fp8_requests), max_num_batched_tokens=sz.max_batched_tokens)


def prefix_args(sz: Sizes, caching: bool) -> dict[str, Any]:
    return dict(enable_prefix_caching=caching, max_model_len=sz.prefix_max_model_len,
                max_num_seqs=sz.prefix_requests, max_num_batched_tokens=sz.max_batched_tokens)


def kv_gib_for(cfg: dict[str, Any], sz: Sizes, dtype_bytes: int) -> float:
    """GiB holding sz.fp8_kv_tokens tokens of KV in the model dtype."""
    return sz.fp8_kv_tokens * shape_of(cfg).kv_bytes_per_token(dtype_bytes) / (1 << 30)


def _dtype_bytes(ctx: Ctx) -> int:
    return 4 if ctx.dtype == "float32" else 2


def _kv_label(ctx: Ctx) -> str:
    return "fp32" if ctx.dtype == "float32" else "bf16"


def _warm_up(llm: Any, vocab: int, seed: int) -> None:
    """Compile and capture what the timed runs use: a few prefills and decodes of every batch bucket kind."""
    generate_throughput(llm, random_prompts(4, 48, vocab, seed=seed + 99), 6)


# ---------------------------------------------------------------------------------------------------
# llama8b: start to ready, KV capacity plan, batch-1 decode, offline 512 x 512/256
# ---------------------------------------------------------------------------------------------------


def plan_capacity(plan: Any, shape: Any, dtype: Any, block_size: int, max_model_len: int) -> dict[str, Any]:
    """Max concurrent tokens with bf16 (model dtype) and fp8 KV from one memory measurement: the engine's
    MemoryPlan on CUDA, or (plan None) a simulated H100 with this shape's weights."""
    from tokenmill.ops.attention.kv_quant import kv_bytes_per_token_per_layer, resolve_kv_cache_dtype
    from tokenmill.worker.memory_planner import DeviceMemory, plan_kv_cache

    if plan is None:
        dev = DeviceMemory(total_bytes=80 * 10**9, weights_bytes=shape.weight_bytes(2),
                           peak_activation_bytes=2 * 10**9, other_bytes=5 * 10**8, name="simulated H100 (no CUDA)")
        util, graphs = 0.9, 3 * 10**8
    else:
        dev, util, graphs, max_model_len = (plan.device, plan.gpu_memory_utilization, plan.cuda_graph_bytes,
                                            plan.max_model_len)
    out: dict[str, Any] = {"device": dev.name, "gpu_memory_utilization": util}
    for kind in ("auto", "fp8"):
        resolved = resolve_kv_cache_dtype(kind, dtype, "cuda", False)  # a CUDA plan: auto = the model dtype
        per_tok = shape.layers * kv_bytes_per_token_per_layer(resolved, shape.kv_heads, shape.head_dim)
        out[kind] = plan_kv_cache(dev, util, per_tok, block_size, max_model_len,
                                  cuda_graph_bytes=graphs).max_concurrent_tokens
    return out


def capacity_rows(ctx: Ctx, step: Step, llm: Any, cfg: dict[str, Any]) -> None:
    """The fp8 / bf16 capacity row at the engine's gpu_memory_utilization (see plan_capacity)."""
    runner = llm.engine.core.runner
    cap = plan_capacity(runner.device_setup.plan, shape_of(cfg), runner.dtype, runner.block_size,
                        runner.max_model_len)
    step.details["capacity_plan"] = cap
    step.add(row(f"max concurrent tokens, fp8 vs {_kv_label(ctx)} KV (plan, {cap['device']})", cap["fp8"], "tokens",
                 ref=cap["auto"], ref_label=f"{_kv_label(ctx)} KV, same memory", target=1.8))


def run_llama8b(ctx: Ctx, step: Step, sz: Sizes) -> None:
    from bench.gpu_roofline import batch1_decode_roofline, offline_roofline

    cfg = load_config("8b", ctx.dry)
    shape, vocab = shape_of(cfg), int(cfg["vocab_size"])
    bw, mm, src = ctx.ceilings()
    step.details.update(ceilings={"bandwidth": bw, "matmul_flops": mm, "source": src}, shape=asdict(shape),
                        weight_gb=shape.weight_bytes(_dtype_bytes(ctx)) / 1e9, args=llama8b_args(sz))
    llm = None
    with step.guard("start to ready"):
        llm, fb = build_llm(ctx, step, "8B engine", model_folder(cfg), **llama8b_args(sz))
        ready = time.time() - ctx.t0
        facts = engine_facts(llm)
        step.details["engine"] = facts
        print(facts["plan"] or "no memory plan (CPU)")
        step.add(row("start to ready (process start -> LLM built)", ready, "s", target=60.0, higher_is_better=False,
                     note=f"engine load {facts['load_time_s']:.1f} s, {len(facts['graph_sizes'])} graphs{fb}"))
    if llm is None:
        return
    with step.guard("KV capacity plan"):
        capacity_rows(ctx, step, llm, cfg)
    with step.guard("warm-up"):
        _warm_up(llm, vocab, ctx.seed)
    with step.guard("batch-1 decode"):
        r = decode_timing(llm, random_prompts(1, sz.batch1_prompt, vocab, ctx.seed + 1), sz.batch1_new)
        step.details["batch1"] = r
        roof = batch1_decode_roofline(shape, bw, _dtype_bytes(ctx), context=sz.batch1_prompt + sz.batch1_new // 2)
        step.add(row(f"batch-1 decode {sz.batch1_prompt}/{sz.batch1_new}", r["decode_tokens_per_s"], "tok/s",
                     ref=roof.tokens_per_s, ref_label=f"bandwidth roofline ({src})", target=0.9,
                     note=f"step p50 {num(r['step_ms_p50'])} ms, TTFT {num(r['ttft_s'], '.0f', 1e3)} ms, "
                          f"graph replays {graph_replays(llm)}{fb}"))
    with step.guard("offline"):
        n, p, o = sz.offline_requests, sz.offline_prompt, sz.offline_new
        r = generate_throughput(llm, random_prompts(n, p, vocab, ctx.seed + 2), o)
        step.details["offline"] = r
        roof = offline_roofline(shape, bw, mm, n, p, o, _dtype_bytes(ctx))
        tps = r["output_tokens_per_s"]
        note = f"{r['seconds']:.1f} s, {r['preemptions']} preemptions{fb}"
        step.add(row(f"offline {n} x {p}/{o}", tps, "tok/s", ref=roof.tokens_per_s,
                     ref_label=f"workload roofline ({src})", target=0.7, note=note))
        step.add(row(f"offline {n} x {p}/{o} vs transformers batched", tps, "tok/s",
                     ref=HF_8B_ANCHORS["offline_512x512_256_batch256"],
                     ref_label="transformers 8B batch 256, H100 (ANCHORS)", target=2.5))
    llm = None
    release()


# ---------------------------------------------------------------------------------------------------
# long32k: batch-1 decode at a 32k context
# ---------------------------------------------------------------------------------------------------


def run_long32k(ctx: Ctx, step: Step, sz: Sizes) -> None:
    from bench.gpu_roofline import long_context_roofline

    cfg = long_config(load_config("8b", ctx.dry), sz)
    shape, vocab = shape_of(cfg), int(cfg["vocab_size"])
    bw, mm, src = ctx.ceilings()
    step.details.update(ceilings={"bandwidth": bw, "matmul_flops": mm, "source": src}, args=long_args(sz))
    llm = None
    with step.guard("load"):
        llm, fb = build_llm(ctx, step, "32k engine", model_folder(cfg), **long_args(sz))
        step.details["engine"] = engine_facts(llm)
    if llm is None:
        return
    with step.guard("warm-up"):
        generate_throughput(llm, random_prompts(1, 64, vocab, ctx.seed + 99), 6)
    with step.guard("32k decode"):
        r = decode_timing(llm, random_prompts(1, sz.long_context, vocab, ctx.seed + 3), sz.long_new)
        step.details["long"] = r
        roof = long_context_roofline(shape, bw, context=sz.long_context + sz.long_new // 2,
                                     dtype_bytes=_dtype_bytes(ctx))
        step.add(row(f"batch-1 decode at {sz.long_context} context", r["decode_tokens_per_s"], "tok/s",
                     ref=roof.tokens_per_s, ref_label=f"roofline with KV reads ({src})", target=0.75,
                     note=f"step p50 {num(r['step_ms_p50'])} ms, graph replays {graph_replays(llm)}{fb}"))
        prefill_s = shape.prefill_flops(sz.long_context) / mm
        step.add(row(f"{sz.long_context}-token prefill (time to first token)", r["ttft_s"], "s", ref=prefill_s,
                     ref_label=f"FLOPs / matmul rate ({src})", higher_is_better=False))
    llm = None
    release()


# ---------------------------------------------------------------------------------------------------
# fp8kv: concurrent tokens and memory-bound throughput, fp8 against bf16 KV in the same memory
# ---------------------------------------------------------------------------------------------------


def run_fp8kv(ctx: Ctx, step: Step, sz: Sizes) -> None:
    cfg = load_config("8b", ctx.dry)
    vocab = int(cfg["vocab_size"])
    kv_gib = kv_gib_for(cfg, sz, _dtype_bytes(ctx))
    prompts = random_prompts(sz.fp8_requests, sz.fp8_prompt, vocab, ctx.seed + 4)
    folder = model_folder(cfg)
    res: dict[str, dict[str, Any]] = {}
    step.details.update(kv_gib=kv_gib, runs=res)
    for kind in ("auto", "fp8"):
        llm = None
        with step.guard(f"{kind} KV load"):
            llm, fb = build_llm(ctx, step, f"{kind} KV engine", folder, **fp8_args(sz, kind, kv_gib))
            runner = llm.engine.core.runner
            res[kind] = {"usable_tokens": (runner.num_blocks - 1) * runner.block_size,
                         "kv_cache_bytes": kv_cache_bytes(llm), "engine": engine_facts(llm), "fallback": fb}
        if llm is None:
            continue
        with step.guard(f"{kind} KV offline"):
            _warm_up(llm, vocab, ctx.seed)
            res[kind]["offline"] = generate_throughput(llm, prompts, sz.fp8_new)
        llm = None
        release()
    a, f = res.get("auto", {}), res.get("fp8", {})
    label = _kv_label(ctx)
    if a and f:
        step.add(row(f"concurrent tokens, fp8 vs {label} KV ({kv_gib:.2f} GiB each)", f["usable_tokens"], "tokens",
                     ref=a["usable_tokens"], ref_label=f"{label} KV", target=1.8,
                     note=f"KV bytes fp8 {f['kv_cache_bytes'] / 2**30:.3f} GiB, {label} "
                          f"{a['kv_cache_bytes'] / 2**30:.3f} GiB"))
    if a.get("offline") and f.get("offline"):
        fo, ao = f["offline"], a["offline"]
        step.add(row(f"memory-bound offline {sz.fp8_requests} x {sz.fp8_prompt}/{sz.fp8_new}, fp8 vs {label} KV",
                     fo["output_tokens_per_s"], "tok/s", ref=ao["output_tokens_per_s"], ref_label=f"{label} KV",
                     target=1.0, note=f"preemptions fp8 {fo['preemptions']}, {label} {ao['preemptions']}"))


# ---------------------------------------------------------------------------------------------------
# prefix: shared-prefix workload with prefix caching on and off
# ---------------------------------------------------------------------------------------------------


def shared_prefix_prompts(sz: Sizes, vocab: int, seed: int) -> list[list[int]]:
    prefix = random_prompts(1, sz.prefix_len, vocab, seed)[0]
    return [prefix + q for q in random_prompts(sz.prefix_requests, sz.question_len, vocab, seed + 1)]


def run_prefix(ctx: Ctx, step: Step, sz: Sizes) -> None:
    cfg = load_config("8b", ctx.dry)
    vocab = int(cfg["vocab_size"])
    prompts = shared_prefix_prompts(sz, vocab, ctx.seed + 5)
    folder = model_folder(cfg)
    res: dict[str, Any] = {}
    step.details["runs"] = res
    for caching in (True, False):
        key = "on" if caching else "off"
        llm = None
        with step.guard(f"prefix caching {key}"):
            llm, fb = build_llm(ctx, step, f"prefix caching {key} engine", folder, **prefix_args(sz, caching))
            _warm_up(llm, vocab, ctx.seed)
            res[key] = {**generate_throughput(llm, prompts, sz.prefix_new), "fallback": fb}
        llm = None
        release()
    if "on" in res and "off" in res:
        on, off = res["on"], res["off"]
        step.add(row(f"shared prefix {sz.prefix_requests} x ({sz.prefix_len} + {sz.question_len})/{sz.prefix_new}, "
                     "caching on vs off", on["requests_per_s"], "req/s", ref=off["requests_per_s"],
                     ref_label="prefix caching off",
                     note=f"{on['prefix_cache_hits']} prompt tokens from the cache; "
                          f"{on['seconds']:.2f} s vs {off['seconds']:.2f} s"))
