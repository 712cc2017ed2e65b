"""`tokenmill plan`: memory plan, predicted goodput and the batch settings that maximize it.

    tokenmill plan [--model M] [--workload chat --slo-ttft 2000 --slo-tpot 150 --rate 2]
                   [--calibrate [--save-calibration F] | --calibration F] [--calibration-trace STEPS.jsonl ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.errors import ConfigError, TokenmillError
from tokenmill.perf.cost_model import CostModel, ModelSpec
from tokenmill.perf.simulator import SimConfig, requests_from_workload, simulate

GiB = 1 << 30
CPU_KV_GIB = 1.0  # the engine's default KV cache on CPU (tokenmill.worker.model_runner)
CHAT_TEMPLATE_TOKENS = 30  # tokens the default model's chat template adds (system message + role tags)
GRID_BATCHED_TOKENS = (256, 512, 1024, 2048, 4096)
GRID_NUM_SEQS = (8, 32, 128)


@dataclass
class MemoryReport:
    device: str
    weights_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    block_size: int
    max_model_len: int
    kv_cache_dtype: str = "float32"  # resolved (kv_quant.resolve_kv_cache_dtype)
    amx_tiles_bytes: int = 0  # gemm auto on an AMX CPU: a small quantized model's linears also kept as bf16 tiles

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_bytes // (self.kv_bytes_per_token * self.block_size)

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def max_requests(self, tokens_per_request: int) -> int:
        per = -(-max(1, tokens_per_request) // self.block_size)
        return self.num_blocks // per

    def lines(self, typical_len: int) -> list[str]:
        return [f"memory ({self.device}):",
                f"  weights              {self.weights_bytes / GiB:8.3f} GiB",
                *([f"  GEMM panels          {self.amx_tiles_bytes / GiB:8.3f} GiB (gemm auto: the packed linears' "
                   "bf16 tiles / int8 panels made once, for faster many-row steps)"] if self.amx_tiles_bytes else []),
                f"  KV per token         {self.kv_bytes_per_token / 1024:8.1f} KiB ({self.kv_cache_dtype})",
                f"  KV cache             {self.kv_cache_bytes / GiB:8.3f} GiB = {self.num_blocks:,} blocks x "
                f"{self.block_size} tokens = {self.max_tokens:,} tokens",
                f"  requests that fit    {self.max_requests(self.max_model_len):,} at max_model_len "
                f"{self.max_model_len}, {self.max_requests(typical_len):,} at the workload's mean "
                f"{typical_len} tokens"]


def _model_dtype(dtype: str, device: str) -> str:
    """--dtype as the engine resolves it (tokenmill.worker.model_runner.resolve_dtype)."""
    return dtype if dtype != "auto" else "float32" if device == "cpu" else "bfloat16"


def kv_cache_dtype_for(kind: str, dtype: str, device: str, head_dim: int) -> str:
    """The KV cache dtype the engine would use (kv_quant.resolve_kv_cache_dtype, with the CPU attention kernel of
    this machine on a CPU device)."""
    import torch

    from tokenmill.ops.attention.kv_quant import resolve_kv_cache_dtype
    from tokenmill.ops.cpu.attention import reads_kv_in_place

    bf16_in_place = device == "cpu" and reads_kv_in_place(torch.bfloat16, head_dim)
    return resolve_kv_cache_dtype(kind, getattr(torch, _model_dtype(dtype, device)), device, bf16_in_place)


def model_spec_for(model: Optional[str], dtype: str, device: str) -> tuple[ModelSpec, int, int]:
    """(spec, weight bytes incl. embeddings, max_model_len) from the model's config, without loading weights."""
    from tokenmill.model.loader import load_hf_config, resolve_model_source
    from tokenmill.worker.memory_planner import dtype_bytes

    src = resolve_model_source(model)
    cfg = load_hf_config(src)
    nb = dtype_bytes(_model_dtype(dtype, device))
    spec = ModelSpec.from_hf_config(cfg, dtype_bytes=nb)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    params = spec.layer_params + spec.lm_head_params * (1 if tied else 2) + spec.num_layers * 2 * spec.hidden_size
    max_len = int(getattr(cfg, "max_position_embeddings", None) or 2048)
    if src.kind == "gguf" and device == "cpu" and _model_dtype(dtype, device) == "float32":
        from tokenmill.ops.cpu.qlinear import available

        if available():  # quantization auto keeps the file's blocks packed (MoE experts too): about the file's size
            return spec, os.path.getsize(src.gguf_path), max_len
    return spec, params * nb, max_len


def amx_tiles_bytes(spec: ModelSpec, model: Optional[str], device: str, dtype: str = "auto") -> int:
    """What gemm auto adds on this machine for a quantized GGUF, or a bf16 / f16 folder under dtype bfloat16
    (tokenmill.model.loader.cpu_packs_16bit), on an AMX or an AVX512-BF16 CPU: its linears' bf16 tiles (2 bytes a
    weight, QuantizedLinear.pack_amx) as tokenmill.model.layers.quantized.finalize_quantized makes them
    (amx_tile_plan: a MoE model, its attention linears only, no LM head; a merged q|k|v or gate|up whose shards
    differ in block type, none; without AMX, a MoE model or any such mixed linear, none at all: the dense copies
    instead); on an AVX512-VNNI CPU without AMX a GGUF's block-quantized linears get int8 panels instead (gemm auto:
    gemm_int8, 1 byte a weight plus 8 bytes per output and group of 64: i8_panel_bytes); else 0."""
    import torch

    from tokenmill.model.layers.quantized import amx_tile_plan, gemm_int8
    from tokenmill.model.loader import cpu_packs_16bit, load_hf_config, resolve_model_source
    from tokenmill.ops.cpu.qlinear import amx_available, bf16_dot_available

    src = resolve_model_source(model)
    amx = amx_available()
    if device != "cpu" or not (amx or bf16_dot_available()):
        return 0
    if src.kind != "gguf" and not (dtype == "bfloat16"
                                   and cpu_packs_16bit(src, torch.bfloat16, "cpu", "auto", "auto")):
        return 0
    cfg = load_hf_config(src)
    moe = any(getattr(cfg, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    mlp = 3 * spec.num_layers * spec.hidden_size * spec.intermediate_size
    layers = 2 * (spec.layer_params - mlp if moe else spec.layer_params)  # routed experts: never tiled
    head = 2 * spec.lm_head_params
    if src.kind == "gguf":  # a Q4_K_M file's q|k|v with a Q6_K v (MixedQuantizedLinear) keeps dequantizing per call
        from tokenmill.model.gguf_utils import gguf_tensor_types

        types = gguf_tensor_types(src.gguf_reader())
        h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        merged = [(("q_proj", "k_proj", "v_proj"), "self_attn", h * (q + 2 * kv))]
        merged += [] if moe else [(("gate_proj", "up_proj"), "mlp", 2 * h * spec.intermediate_size)]
        for i in range(spec.num_layers):
            for names, sub, params in merged:
                if len({types.get(f"model.layers.{i}.{sub}.{n}.weight") for n in names}) > 1:
                    if not amx:
                        return 0
                    layers -= 2 * params
        if moe and not amx:
            return 0
    if src.kind == "gguf" and not amx and not moe and gemm_int8("auto"):  # int8 panels (F16 tensors too: slightly
        from tokenmill.ops.cpu.qlinear import i8_group                 # under their bf16 panels' 2 bytes)

        def i8(k: int, n: int) -> float:  # i8_panel_bytes without the rounding of n up to 32
            return k * n * (1 + 8 / i8_group(k))

        h, q, kv, inter = (spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim,
                           spec.intermediate_size)
        layers = int(spec.num_layers * (i8(h, q + 2 * kv) + i8(q, h) + i8(h, 2 * inter) + i8(inter, h)))
        head = int(spec.lm_head_params * (1 + 8 / i8_group(h)))
    tile_layers, tile_head = amx_tile_plan(layers, head, moe)
    return layers * tile_layers + head * tile_head


def memory_report(spec: ModelSpec, weights_bytes: int, device: str, args: argparse.Namespace,
                  max_model_len: int, kv_cache_dtype: str = "float32") -> MemoryReport:
    """KV-cache size: --num-kv-blocks, --kv-cache-memory, the CPU default, or the GPU planner. spec's
    kv_dtype_bytes are those of kv_cache_dtype (resolved)."""
    per_token = spec.kv_bytes_per_token
    if args.num_kv_blocks:
        kv = args.num_kv_blocks * per_token * args.block_size
    elif args.kv_cache_memory:
        kv = int(args.kv_cache_memory * GiB)
    elif device == "cpu":
        kv = int(CPU_KV_GIB * GiB)
    else:
        from tokenmill.worker.memory_planner import DeviceMemory, plan_kv_cache

        total = int(args.device_memory * GiB) if args.device_memory else _cuda_total()
        act = args.max_num_batched_tokens * (6 * spec.hidden_size + 3 * spec.intermediate_size) * spec.dtype_bytes
        act += args.max_num_seqs * spec.vocab_size * 4
        plan = plan_kv_cache(DeviceMemory(total, weights_bytes, act, 2 * GiB, device), args.gpu_memory_utilization,
                             per_token, args.block_size, max_model_len)
        kv = plan.kv_cache_bytes
    return MemoryReport(device, weights_bytes, per_token, kv, args.block_size, max_model_len, kv_cache_dtype,
                        amx_tiles_bytes(spec, getattr(args, "model", None), device, getattr(args, "dtype", "auto")))


def _cuda_total() -> int:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("no CUDA device here: give --device-memory GIB (or --kv-cache-memory) to plan for one")
    return torch.cuda.get_device_properties(0).total_memory


def get_cost_model(args: argparse.Namespace, spec: ModelSpec, device: str) -> CostModel:
    """--calibrate: time the real engine (and save with --save-calibration); else the roofline prior."""
    if args.calibrate:
        from tokenmill.engine.llm import LLM
        from tokenmill.perf.cost_model import calibrate

        kw = {"dtype": args.dtype, "device": args.device, "kv_cache_dtype": args.kv_cache_dtype}
        if args.max_model_len:
            kw["max_model_len"] = args.max_model_len
        model = calibrate(LLM(args.model, **kw))
        if args.save_calibration:
            model.save(args.save_calibration)
        return model
    return CostModel.prior(spec, device)


def _run(reqs, cost, cfg, args) -> Any:
    return simulate(reqs, cost, cfg, args.slo_ttft, args.slo_tpot, rate=args.rate or 0.0)


def find_max_rate(args, cost: CostModel, cfg: SimConfig, target: float = 0.9, iters: int = 7) -> float:
    """Highest Poisson rate at which >= target of requests meet the SLOs (bisection in log space)."""
    lo, hi = 0.0, None
    rate = 1.0
    for _ in range(iters + 6):
        reqs = requests_from_workload(args.workload, args.num_requests, rate, args.seed,
                                      chat_overhead=CHAT_TEMPLATE_TOKENS)
        ok = simulate(reqs, cost, cfg, args.slo_ttft, args.slo_tpot, rate).slo_attainment >= target
        if ok:
            lo = rate
        else:
            hi = rate
        if hi is None:
            rate *= 2
        elif lo == 0.0:
            rate /= 2
            if rate < 1e-3:
                return 0.0
        else:
            if hi / lo < 1.1:
                break
            rate = math.sqrt(lo * hi)
    return lo


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        return _plan(args)
    except TokenmillError as exc:
        print(f"tokenmill plan: error: {exc}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    if args.rate is not None and not (args.rate > 0 and math.isfinite(args.rate)):
        raise ConfigError(f"--rate must be a positive number of requests per second, got {args.rate}")
    if args.instances < 1:
        raise ConfigError(f"--instances must be at least 1, got {args.instances}")
    if args.instances == 1 and args.prefill_instances:
        raise ConfigError("--prefill-instances needs --instances > 1")
    if args.num_requests < 1:
        raise ConfigError(f"--num-requests must be at least 1, got {args.num_requests}")
    device = "cpu" if args.device in ("auto", "cpu") and not _has_cuda(args.device) else "cuda"
    probe = requests_from_workload(args.workload, args.num_requests, args.rate or 1.0, args.seed,
                                   chat_overhead=CHAT_TEMPLATE_TOKENS)
    saved = CostModel.load(args.calibration) if args.calibration else None
    if saved is not None and saved.info.get("model") == args.model and "weights_total_bytes" in saved.info:
        # the calibration recorded the model: no need to read its file again
        spec, weights, model_len = saved.spec, int(saved.info["weights_total_bytes"]), int(saved.info["max_model_len"])
    else:
        spec, weights, model_len = model_spec_for(args.model, args.dtype, device)
    from tokenmill.worker.memory_planner import dtype_bytes

    kv_dtype = kv_cache_dtype_for(args.kv_cache_dtype, args.dtype, device, spec.head_dim)
    spec = dataclasses.replace(spec, kv_dtype_bytes=dtype_bytes(kv_dtype))  # int8's per-token scales left out
    max_len = min(args.max_model_len or model_len, model_len)
    mem = memory_report(spec, weights, device, args, max_len, kv_dtype)
    typical = round(sum(r.prompt_len + r.output_len for r in probe) / len(probe))
    cost = saved if saved is not None else get_cost_model(args, spec, device)
    traces_info = None
    if args.calibration_trace:  # the model refitted to what a served instance's steps took (perf/step_trace.py)
        from tokenmill.perf.step_trace import fit_passes_like, read_step_trace, speed_drift

        passes = [read_step_trace(p) for p in args.calibration_trace]
        for p, steps in zip(args.calibration_trace, passes):
            if not steps:
                raise ConfigError(f"step trace {p} holds no steps")
        cost, speeds = fit_passes_like(cost, passes)
        names = ", ".join(args.calibration_trace)
        print(f"cost model fitted to {cost.info['num_steps']} served steps of {names} (median "
              f"error {cost.info['median_rel_error']:.1%}, steps of {cost.info['trace_tokens_range'][0]}-"
              f"{cost.info['trace_tokens_range'][1]} tokens)")
        traces_info = {"files": list(args.calibration_trace), "speeds": speeds, "drift": speed_drift(speeds)}
        if len(speeds) > 1:
            print("the traces' speeds against that fit: " + ", ".join(f"{v:.3f}x" for v in speeds) +
                  f" (drift between them {traces_info['drift']:.1%}: the machine's speed moves by as much between "
                  f"passes, and a single pass's prediction with it)")
    out: dict[str, Any] = {"memory": {"weights_bytes": mem.weights_bytes, "amx_tiles_bytes": mem.amx_tiles_bytes,
                                      "kv_cache_dtype": kv_dtype,
                                      "kv_bytes_per_token": mem.kv_bytes_per_token,
                                      "kv_cache_bytes": mem.kv_cache_bytes, "kv_tokens": mem.max_tokens,
                                      "max_requests_at_max_model_len": mem.max_requests(max_len),
                                      "max_requests_at_workload_mean": mem.max_requests(typical)},
                           "cost_model": {k: v for k, v in cost.to_dict().items() if k != "info"}}
    if traces_info is not None:
        out["calibration_traces"] = traces_info
    print("\n".join(mem.lines(typical)))
    calibrated = cost.info.get("calibrated", False)
    print(f"cost model: {'calibrated' if calibrated else 'UNCALIBRATED roofline prior (use --calibrate)'}; "
          f"decode step (1 req, 512 ctx) {cost.predict(1, 1, 512, 512) * 1e3:.1f} ms, "
          f"prefill 512 tokens {cost.predict(512, 1, 512, 512 * 513 // 2) * 1e3:.1f} ms")

    def cfg_for(mnbt: int, seqs: int) -> SimConfig:
        return SimConfig(num_blocks=mem.num_blocks, block_size=args.block_size, max_model_len=max_len,
                         max_num_seqs=seqs, max_num_batched_tokens=mnbt, policy=args.policy)

    base = cfg_for(args.max_num_batched_tokens, args.max_num_seqs)
    if args.instances > 1:
        from tokenmill.perf.fleet_cli import plan_fleet

        args.chat_overhead = CHAT_TEMPLATE_TOKENS
        plan_fleet(args, cost, base, out)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    rate = args.rate
    if rate is None and not (args.slo_ttft or args.slo_tpot):
        # no SLO: every rate meets it; predict at 80% of the capacity (all requests arriving at once)
        reqs = requests_from_workload(args.workload, args.num_requests, 1e9, args.seed,
                                      chat_overhead=CHAT_TEMPLATE_TOKENS)
        cap = simulate(reqs, cost, base, None, None, 1e9).summary()["request_throughput"]
        print(f"no SLO given (--slo-ttft / --slo-tpot): capacity {cap:.3g} req/s; predicting at 80% of it")
        out["capacity"] = cap
        rate = 0.8 * cap
    if rate is None:
        rate = find_max_rate(args, cost, base)
        print(f"highest rate meeting the SLOs for >= 90% of requests (current settings): {rate:.3g} req/s")
        out["max_rate"] = rate
        rate = rate or 0.1
    reqs = requests_from_workload(args.workload, args.num_requests, rate, args.seed, chat_overhead=CHAT_TEMPLATE_TOKENS)
    slo = f"TTFT <= {args.slo_ttft} ms, TPOT <= {args.slo_tpot} ms" if (args.slo_ttft or args.slo_tpot) else "no SLO"
    print(f"predicted at {rate:.3g} req/s, workload {args.workload}, {slo}, policy {args.policy} "
          f"({args.num_requests} simulated requests):")
    print(f"  {'max_num_batched_tokens':>22} {'max_num_seqs':>12} {'goodput':>9} {'attain':>7} "
          f"{'TTFT p50':>9} {'TPOT p50':>9} {'tok/s':>8}")
    grid = []
    for mnbt in sorted(set(GRID_BATCHED_TOKENS) | {args.max_num_batched_tokens}):
        for seqs in sorted(set(GRID_NUM_SEQS) | {args.max_num_seqs}):
            s = simulate(reqs, cost, cfg_for(mnbt, seqs), args.slo_ttft, args.slo_tpot, rate).summary()
            grid.append((mnbt, seqs, s))
            mark = " (current)" if (mnbt, seqs) == (args.max_num_batched_tokens, args.max_num_seqs) else ""
            print(f"  {mnbt:>22} {seqs:>12} {s['goodput']:>9.3f} {s['slo_attainment']:>7.2f} "
                  f"{_ms(s['ttft_ms']['p50']):>9} {_ms(s['tpot_ms']['p50']):>9} {s['output_throughput']:>8.1f}{mark}")
    best = max(grid, key=lambda g: (round(g[2]["goodput"], 6), g[2]["output_throughput"]))
    print(f"best: --max-num-batched-tokens {best[0]} --max-num-seqs {best[1]} "
          f"(goodput {best[2]['goodput']:.3f} req/s; predicted by simulation)")
    out.update(rate=rate, grid=[{"max_num_batched_tokens": m, "max_num_seqs": n, **s} for m, n, s in grid],
               best={"max_num_batched_tokens": best[0], "max_num_seqs": best[1]})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def _has_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def add_plan_args(subparsers: Any) -> argparse.ArgumentParser:
    """Register `tokenmill plan` on the top-level subparsers."""
    p = subparsers.add_parser("plan", help="memory plan, predicted goodput, best batch settings",
                              description="Predict memory use, latency and goodput with a calibrated step-time "
                                          "model and a simulation of the real scheduler.")
    p.add_argument("--model", default=None, help="model folder or .gguf (default: the bundled SmolLM2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workload", default="chat", help="a `bench serve` workload spec (default chat)")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="MS", help="time-to-first-token target")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="MS", help="time-per-output-token target")
    p.add_argument("--rate", type=float, default=None, help="request rate (default: the highest that meets the SLOs)")
    p.add_argument("--num-requests", type=int, default=200, help="simulated requests per run")
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "priority", "slo", "fair"])
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "fp8", "int8"],
                   help="as the engine flag (auto: bfloat16 on an AVX-512 CPU for a float32 model, else the "
                        "model dtype)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB", help="plan for a GPU of this size")
    p.add_argument("--calibrate", action="store_true", help="load the model and time real steps first")
    p.add_argument("--calibration", default=None, metavar="FILE", help="a saved calibration (JSON)")
    p.add_argument("--save-calibration", default=None, metavar="FILE", help="with --calibrate: save it here")
    p.add_argument("--calibration-trace", default=None, metavar="FILE", action="append",
                   help="fit the cost model to a served instance's step trace (`serve --step-trace FILE`): the steps "
                        "it ran serving the workload, at the speed it ran them (regimes from --calibration if given); "
                        "repeat it for passes taken at different times: one fit to all of them, and each pass's "
                        "speed against it (the machine's drift between passes) is printed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    from tokenmill.perf.fleet_cli import add_fleet_args

    add_fleet_args(p)
    p.set_defaults(func=cmd_plan)
    return p
