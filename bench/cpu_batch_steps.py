"""Step times of the served workload's two kinds of step, in process (the real scheduler and runner, default
engine settings, prefix caching off): decode-only steps of C running requests (each ~200 tokens in, greedy), and
prefill-only steps of P prompts of 200 tokens (P x 200 tokens a step, as the scheduler packs a burst of new
requests). What `bench/cpu_mixed_profile.py` runs mixed, split so an A/B of a kernel change reads directly.

    PYTHONPATH=.:bench python bench/cpu_batch_steps.py [--decodes 64,16] [--steps 70] [--prefill 10] [--repeats 5]
        [--plain-glu-tiles] [--kv-cache-dtype auto|float32|bfloat16|int8|fp8] [--model PATH] [--dtype bfloat16]

--plain-glu-tiles: the gate|up linears' plain AMX tiles (the g|u output, then a silu pass) instead of the tiles
paired for the fused layer's silu(gate) * up epilogue (the default where the tiles are made once): an A/B of it.
--kv-cache-dtype: the engine's setting of that name (default auto), for an A/B of KV cache dtypes.
"""
from __future__ import annotations

import argparse
import statistics
import time

from cpu_decode_profile import _ids  # the same synthetic prompts (bench/ is on the path when run as a script)
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.llm import LLM
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def _scheduler(runner, cfg, block) -> Scheduler:
    return Scheduler(cfg, runner.num_blocks, block, runner.max_model_len, enable_prefix_caching=False)


def _step(sched: Scheduler, runner) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = sched.schedule()
    res = runner.execute_model(out)
    sched.update_from_output(out, res)
    return out.num_scheduled_tokens, time.perf_counter() - t0


def _add(sched: Scheduler, n: int, output: int, tag: str) -> None:
    for i in range(n):
        sched.add_request(Request(f"{tag}{i}", _ids(200, i), SamplingParams(temperature=0.0, max_tokens=output,
                                                                          ignore_eos=True), (), time.monotonic(),
                                  output))


def _tiles(model, plain: bool) -> None:
    """--plain-glu-tiles: re-make the gate|up tiles unpaired and re-install the fused layers (which read them)."""
    from tokenmill.ops.cpu.layer import fuse_cpu_layers

    mlps = [layer.mlp for layer in model.model.layers]
    if not all(hasattr(m, "gate_up_proj") for m in mlps):  # a MoE model: its experts are never tiled
        print("gate|up tiles: none (MoE experts)")
        return
    if plain and all(getattr(m.gate_up_proj, "qpanels", None) is not None for m in mlps):
        for m in mlps:
            m.gate_up_proj.pack_amx()
        fuse_cpu_layers(model)
    print("gate|up tiles:", "plain" if plain else "paired (GLU epilogue)" if all(
        getattr(getattr(m.gate_up_proj, "qpanels", None), "glu", 0) for m in mlps) else "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", default="64,16", help="running requests of the decode-only steps, comma-separated")
    ap.add_argument("--steps", type=int, default=70, help="steps per decode batch (the first ones prefill)")
    ap.add_argument("--prefill", type=int, default=10, help="prompts of 200 tokens per prefill-only step")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plain-glu-tiles", action="store_true", help="gate|up tiles without the GLU epilogue")
    ap.add_argument("--kv-cache-dtype", default="auto", help="the engine's --kv-cache-dtype")
    ap.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2 GGUF)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    kw = dict(enable_prefix_caching=False, num_threads=args.threads, kv_cache_dtype=args.kv_cache_dtype,
              dtype=args.dtype, **({"model": args.model} if args.model else {}))
    for c in [int(v) for v in args.decodes.split(",") if v]:
        llm = LLM(max_num_seqs=c, **kw)
        core = llm.engine.core
        _tiles(core.runner.model, args.plain_glu_tiles)
        print("KV cache:", core.runner.kv_cache_dtype)
        sched = _scheduler(core.runner, core.config.scheduler, core.config.cache.block_size)
        _add(sched, c, args.steps + 10, "d")
        times = []
        for _ in range(args.steps):
            sched_tokens, dt = _step(sched, core.runner)
            if len(sched_tokens) == c and all(n == 1 for n in sched_tokens.values()):
                times.append(dt * 1e3)
        print(f"{c} decodes a step: {len(times)} steps, p50 {statistics.median(times):.1f} ms, "
              f"min {min(times):.1f} ms")
        del llm, core, sched
    if args.prefill:
        llm = LLM(max_num_seqs=args.prefill, **kw)
        core = llm.engine.core
        _tiles(core.runner.model, args.plain_glu_tiles)
        times = []
        for r in range(args.repeats + 1):
            sched = _scheduler(core.runner, core.config.scheduler, core.config.cache.block_size)
            _add(sched, args.prefill, 1, f"p{r}_")
            sched_tokens, dt = _step(sched, core.runner)
            if r:  # the first is a warm-up
                times.append(dt * 1e3)
        print(f"{args.prefill} x 200-token prefill step ({sum(sched_tokens.values())} tokens): "
              f"p50 {statistics.median(times):.1f} ms, min {min(times):.1f} ms "
              f"({sum(sched_tokens.values()) / statistics.median(times) * 1e3:.0f} prompt tok/s)")


if __name__ == "__main__":
    main()
