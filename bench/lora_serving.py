"""Multi-LoRA serving throughput, in-process, on the default model (or --model), side by side in one run.

8 adapters of rank 16 on all seven projections (random weights, written as PEFT folders in a temp dir), and
C concurrent requests (C = 16 and 64 by default) of --prompt-len prompt tokens and --out-len generated tokens:
  base       all C requests on the base model alone, one batch (the fused C layer runs every step)
  multi-lora the C requests spread round-robin over the 8 adapters, one batch (max_loras 8: batched LoRA)
  grouped    the same requests one adapter at a time (C/8 per group, the groups one after another): what a
             server without batched heterogeneous LoRA must do
  multi-f32  (--f32-lora) multi-lora with the fused layer's float32 LoRA kernel instead of the bfloat16 one
  base/8     the base model alone on one group's requests (C/8): what grouped would reach if its LoRA term
             cost nothing, so base / base-per-group bounds multi-lora / grouped from above
Generated tokens/s for each; the ratios multi-lora / base and multi-lora / grouped. With --repeat N the modes run
N times interleaved (base, multi-lora, grouped, base/8, base, ...; on a shared machine a neighbour's burst then
hits one trial, not one mode): every trial is kept in the json, the table shows each mode's median.

    PYTHONPATH=. python bench/lora_serving.py [--concurrency 16,64] [--prompt-len 64] [--out-len 64]
        [--threads 2] [--repeat 1] [--f32-lora] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time

import torch
from safetensors.torch import save_file

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.lora.request import LoRARequest
from tokenmill.sampling_params import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(path: str, shapes: dict, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes["num_layers"]):
        for t in TARGETS:
            fan_in, fan_out = shapes["targets"][t]
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS,
                   "bias": "none"}, f)


def run(engine: LLMEngine, prompts: list[list[int]], loras: list, out_len: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i, (ids, lr) in enumerate(zip(prompts, loras)):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", None, params, prompt_token_ids=ids, lora_request=lr)
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--f32-lora", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    cfg = EngineConfig.from_kwargs(model=args.model, num_threads=args.threads, enable_lora=True,
                                   max_loras=args.adapters, max_lora_rank=args.rank, max_num_seqs=max(conc),
                                   enable_prefix_caching=False)
    engine = LLMEngine.from_config(cfg)
    tmp = tempfile.mkdtemp(prefix="lora_bench_")
    loras = []
    for i in range(args.adapters):
        path = os.path.join(tmp, f"a{i}")
        write_adapter(path, engine.lora_shapes, args.rank, seed=i)
        lr = LoRARequest(f"a{i}", i + 1, path)
        engine.add_lora(lr)
        loras.append(lr)
    rng = random.Random(0)
    vocab = engine.processor.vocab_size if hasattr(engine.processor, "vocab_size") else 49152
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
               platform.machine(), "args": vars(args), "runs": []}
    run(engine, [[rng.randrange(100, vocab - 1) for _ in range(16)]] * 2, [None, loras[0]], 4)  # warm-up
    for c in conc:
        prompts = [[rng.randrange(100, vocab - 1) for _ in range(args.prompt_len)] for _ in range(c)]
        mixed = [loras[i % len(loras)] for i in range(c)]
        group = max(1, c // len(loras))
        trials = []
        for _ in range(args.repeat):
            t = {}
            s, n = run(engine, prompts, [None] * c, args.out_len)
            t["base_tok_s"] = n / s
            unfused0 = engine.stats().lora_unfused_steps
            s, n = run(engine, prompts, mixed, args.out_len)
            t["multi_lora_tok_s"] = n / s
            t["multi_lora_unfused_steps"] = engine.stats().lora_unfused_steps - unfused0
            if args.f32_lora:
                rt = engine.core.executor._runner.lora
                bf16 = rt.c_bf16
                rt.set_c_bf16(False)
                s, n = run(engine, prompts, mixed, args.out_len)
                rt.set_c_bf16(bf16)
                t["multi_lora_f32_tok_s"] = n / s
            total_s, total_n = 0.0, 0
            for lr in loras:
                idx = [i for i in range(c) if mixed[i] is lr]
                s, n = run(engine, [prompts[i] for i in idx], [lr] * len(idx), args.out_len)
                total_s, total_n = total_s + s, total_n + n
            t["grouped_tok_s"] = total_n / total_s
            s, n = run(engine, prompts[:group], [None] * group, args.out_len)
            t["base_per_group_tok_s"] = n / s
            trials.append(t)
        row = {"concurrency": c, "trials": trials}
        for k in trials[0]:
            row[k] = statistics.median(t[k] for t in trials)
        row["multi_lora_unfused_steps"] = sum(t["multi_lora_unfused_steps"] for t in trials)
        row["lora_bf16"] = engine.core.executor._runner.lora.c_bf16
        row["multi_vs_base"] = row["multi_lora_tok_s"] / row["base_tok_s"]
        row["multi_vs_grouped"] = row["multi_lora_tok_s"] / row["grouped_tok_s"]
        row["grouped_bound"] = row["base_tok_s"] / row["base_per_group_tok_s"]
        for t in trials:
            f32 = f"  multi-f32 {t['multi_lora_f32_tok_s']:7.1f}" if args.f32_lora else ""
            print(f"  trial C={c:3d}  base {t['base_tok_s']:7.1f}  multi-lora {t['multi_lora_tok_s']:7.1f}{f32}  "
                  f"grouped {t['grouped_tok_s']:7.1f}  base/8 {t['base_per_group_tok_s']:7.1f} tok/s  multi/base "
                  f"{t['multi_lora_tok_s'] / t['base_tok_s']:.2f}", flush=True)
        results["runs"].append(row)
        print(f"C={c:3d}  base {row['base_tok_s']:7.1f} tok/s  multi-lora {row['multi_lora_tok_s']:7.1f} tok/s  "
              f"grouped {row['grouped_tok_s']:7.1f} tok/s  base/8 {row['base_per_group_tok_s']:7.1f} tok/s  "
              f"multi/base {row['multi_vs_base']:.2f}  multi/grouped {row['multi_vs_grouped']:.2f}  "
              f"(base / base-per-group {row['grouped_bound']:.2f})"
              + (f"  multi-f32 {row['multi_lora_f32_tok_s']:7.1f} tok/s" if args.f32_lora else ""), flush=True)
    engine.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
