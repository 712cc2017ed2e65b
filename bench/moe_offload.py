"""Expert offload on the Mixtral-8x7B shape (random weights, bf16, one GPU): decode tokens/s with half of the
experts cached on the GPU (--moe-expert-cache-gb; misses run on the CPU or are fetched by the cost model), the
same with next-layer prefetch, and with every expert on the CPU (the non-expert weights on the GPU in all three).

    python bench/moe_offload.py [--layers 32] [--batch 1] [--prompt 32] [--new 64] [--json OUT]
    python bench/moe_offload.py --dry-run     # tiny Mixtral on the CPU, the device pool simulated by a CPU one

Needs CUDA (exits with a one-line error without it, unless --dry-run). The full shape holds 32 x 8 experts of
3 x 4096 x 14336 bf16 weights (~88 GiB) in host memory; --layers N builds the first N layers only (the per-layer
cost is the same, decode time scales with N), which is what the GPU suite's optional step does. One engine is
loaded; the variants re-install the offload on its model (the experts already live on the host).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "bench", "configs", "mixtral-8x7b.json")
TINY = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32"}


def mixtral_config(layers: Optional[int], dry: bool) -> dict[str, Any]:
    if dry:
        cfg = dict(TINY)
    else:
        with open(CONFIG) as f:
            cfg = json.load(f)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def expert_bytes(cfg: dict[str, Any], dtype_bytes: int) -> int:
    return 3 * cfg["hidden_size"] * cfg["intermediate_size"] * dtype_bytes


def engine_args(cfg: dict[str, Any], cache_experts: int, batch: int, prompt: int, new: int, cuda: bool,
                prefetch: bool = False) -> dict[str, Any]:
    """The engine of the run. On CUDA the cache is given in GiB (what a user types): cache_experts experts' worth,
    plus a little so rounding down cannot lose one. On the CPU (dry run) no cache flag: the pool is installed by hand."""
    args = dict(load_format="dummy", dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu",
                skip_tokenizer_init=True, max_model_len=prompt + new + 16, max_num_seqs=max(batch, 4),
                max_num_batched_tokens=max(512, prompt * batch))
    if cuda:
        one = expert_bytes(cfg, 2)
        args.update(moe_expert_cache_gb=(cache_experts * one + one // 2) / 2**30, moe_expert_prefetch=prefetch)
    return args


def variants(total: int, fraction: float) -> list[tuple[str, int, bool]]:
    """(name, cached experts, prefetch)."""
    half = int(total * fraction)
    return [("cache_half", half, False), ("cache_half_prefetch", half, True), ("all_experts_on_cpu", 0, False)]


def run(layers: Optional[int], batch: int, prompt: int, new: int, dry: bool, fraction: float = 0.5,
        seed: int = 0) -> dict[str, Any]:
    import torch

    from bench.gpu_suite.common import decode_timing, generate_throughput, model_folder, random_prompts, release
    from tokenmill import LLM
    from tokenmill.model.layers.expert_offload import ExpertOffload

    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        raise SystemExit("moe_offload.py: error: needs CUDA (use --dry-run for the tiny CPU version)")
    cfg = mixtral_config(layers, dry)
    total = cfg["num_hidden_layers"] * cfg["num_local_experts"]
    runs = variants(total, fraction)
    t0 = time.perf_counter()
    llm = LLM(model=model_folder(cfg), seed=seed, **engine_args(cfg, runs[0][1], batch, prompt, new, cuda))
    load_s = time.perf_counter() - t0
    model = llm.engine.core.runner.model
    device = torch.device("cuda" if cuda else "cpu")
    prompts = random_prompts(batch, prompt, cfg["vocab_size"], seed=seed)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run, simulated pool)",
                           "layers": cfg["num_hidden_layers"], "experts": total, "batch": batch, "prompt": prompt,
                           "new_tokens": new, "load_s": load_s, "expert_mib": expert_bytes(cfg, 2 if cuda else 4) / 2**20,
                           "host_threads": torch.get_num_threads(), "dry_run": dry, "runs": {}}
    for name, cached, prefetch in runs:
        model.expert_offload = None
        release()
        off = ExpertOffload.install(model, cached, device, prefetch=prefetch)
        generate_throughput(llm, random_prompts(batch, prompt, cfg["vocab_size"], seed=seed + 1), 4)  # warm up
        before = dataclasses.replace(off.stats)
        timing = decode_timing(llm, prompts, new)
        s = off.stats
        delta = {f.name: getattr(s, f.name) - getattr(before, f.name) for f in dataclasses.fields(s)
                 if f.name not in ("capacity", "resident")}
        hits, misses = delta["hits"], delta["misses"]
        out["runs"][name] = {"cached_experts": cached, "prefetch": prefetch,
                             "decode_tokens_per_s": timing["decode_tokens_per_s"], "step_ms_p50": timing["step_ms_p50"],
                             "ttft_s": timing["ttft_s"], "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                             "cache": delta}
    base = out["runs"]["all_experts_on_cpu"]["decode_tokens_per_s"]
    for r in out["runs"].values():
        r["speedup_vs_all_on_cpu"] = r["decode_tokens_per_s"] / base if base and r["decode_tokens_per_s"] else None
    return out


def table(res: dict[str, Any]) -> str:
    shape = "tiny Mixtral" if res["dry_run"] else "Mixtral-8x7B shape"
    lines = [f"# expert offload, {shape} ({res['layers']} layers, {res['experts']} experts of "
             f"{res['expert_mib']:.3g} MiB), {res['device']}, batch {res['batch']}, {res['new_tokens']} new tokens",
             "| run | cached experts | decode tok/s | vs all on CPU | hit rate | host pairs | fetches | prefetches |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        c = r["cache"]
        sp = r["speedup_vs_all_on_cpu"]
        lines.append(f"| {name} | {r['cached_experts']} | {r['decode_tokens_per_s']:.2f} | "
                     f"{sp:.2f}x | {r['hit_rate']:.2f} | {c['host_tokens']} | {c['fetches']} | {c['prefetches']} |"
                     if sp is not None else f"| {name} | {r['cached_experts']} | - | - | - | - | - | - |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="layers to build (default: the config's 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--cache-fraction", type=float, default=0.5, help="experts cached on the GPU (default half)")
    ap.add_argument("--dry-run", action="store_true", help="tiny Mixtral on the CPU with a simulated device pool")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        ap.error("--layers must be at least 1")
    if not 0.0 < a.cache_fraction < 1.0:
        ap.error("--cache-fraction must be in (0, 1)")
    res = run(a.layers, a.batch, a.prompt, a.new, a.dry_run, a.cache_fraction)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
