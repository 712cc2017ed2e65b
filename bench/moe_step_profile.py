"""Where a MoE model's steps go, in process: the CPU peer harness's throughput prompts (tput16 / tput64) through
LLMEngine.step() with forward hooks timing each module, split by step kind (prefill / decode of N streams).

    python bench/moe_step_profile.py --model /tmp/tokenmill_moe/olmoe-16.Q4_K_M.gguf --streams 16 [--tokens 128]

Per decode step (ms, mean over the decode steps of `--streams` rows): the layers' parts (norms, qkv, q/k norm,
attention core, o, the rest of the attention block = split / rotary / reshape, router linear, routing = softmax /
top-k / counts, experts = the fused op), the final norm, the LM head, and what lies outside the model forward (the
scheduler, the sampler, Python). Also the rows each active expert got per decode layer (routing concentration).
Hooks add a few microseconds per module call (~100 a step): the "outside" figure is the step's wall time minus the
timed parts. Run under `flock -x /work/cpu.lock` (timings).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPTS = "/work/shared/bench/cpu_peers/prompts.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default=PROMPTS)
    ap.add_argument("--no-hooks", action="store_true", help="wall time only (no per-module timing)")
    ap.add_argument("--fused", action="store_true", help="keep the fused C MoE layers (default: the per-op path, "
                    "which the hooks can split; fused, only the forward, LM head and outside are timed)")
    ap.add_argument("--engine-arg", action="append", default=[], help="key=value engine arguments")
    a = ap.parse_args()

    import torch

    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams

    extra = {}
    for kv in a.engine_arg:
        k, v = kv.split("=", 1)
        extra[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
    args = {"num_threads": a.threads, "enable_prefix_caching": False, "kv_cache_memory": 4, **extra}
    t0 = time.perf_counter()
    eng = LLMEngine.from_config(EngineConfig.from_kwargs(model=a.model, **args))
    print(f"load {time.perf_counter() - t0:.1f} s; tokenmill from {sys.modules['tokenmill'].__file__}", flush=True)
    model = eng.core.runner.model
    if not a.fused:
        from tokenmill.ops.cpu.moe_layer import unfuse_moe_layers

        unfuse_moe_layers(model)
    prompts = [x["ids"] for x in json.load(open(a.prompts))["throughput"][:a.streams]]

    acc: dict[str, float] = collections.defaultdict(float)  # ms in the current step per part
    starts: dict[int, float] = {}
    step_tokens = [0]
    expert_rows: list[int] = []

    def timed(mod, name):
        def pre(m, args):
            starts[id(m)] = time.perf_counter()
            if name == "forward":
                step_tokens[0] = args[0].shape[0]

        def post(m, args, out):
            acc[name] += (time.perf_counter() - starts.pop(id(m))) * 1e3
        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)

    if not a.no_hooks:
        timed(model.model, "forward")
        timed(model.lm_head, "lm_head")
        timed(model.model.norm, "final_norm")
        timed(model.model.embed_tokens, "embed")
        for layer in model.model.layers if not a.fused else []:  # fused: the op must stay fused_moe_cpu
            at = layer.self_attn
            timed(layer.input_layernorm, "norms")
            timed(layer.post_attention_layernorm, "norms")
            timed(at, "attn_block")
            timed(at.qkv_proj, "qkv_mixed" if at.qkv_proj.qtype == "mixed" else "qkv_tiled"
                  if getattr(at.qkv_proj, "qpanels", None) is not None else "qkv_plain")
            if getattr(at, "q_norm", None) is not None:
                timed(at.q_norm, "qk_norm")
                timed(at.k_norm, "qk_norm")
            timed(at.attn, "attn_core")
            timed(at.o_proj, "o")
            timed(layer.mlp, "moe_block")
            timed(layer.mlp.gate, "router")
            op = layer.mlp.op

            def wrapped(x, experts, w, ids, _op=op):
                t = time.perf_counter()
                out = _op(x, experts, w, ids)
                acc["experts"] += (time.perf_counter() - t) * 1e3
                if x.shape[0] == a.streams:
                    expert_rows.extend(c for c in torch.bincount(ids.reshape(-1)).tolist() if c)
                return out
            layer.mlp.op = wrapped

    params = SamplingParams(temperature=0.0, max_tokens=a.tokens, min_tokens=a.tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, ignore_eos=True)
    for i, p in enumerate(prompts[:2]):
        eng.add_request(f"w{i}", None, warm, prompt_token_ids=list(p))
    while eng.has_unfinished_requests():
        eng.step()
    acc.clear()
    expert_rows.clear()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", None, params, prompt_token_ids=list(p))
    steps = []
    t_all = time.perf_counter()
    while eng.has_unfinished_requests():
        acc.clear()
        step_tokens[0] = 0
        t = time.perf_counter()
        eng.step()
        wall = (time.perf_counter() - t) * 1e3
        steps.append((step_tokens[0], wall, dict(acc)))
    total = time.perf_counter() - t_all
    gen = a.streams * a.tokens
    print(f"{a.streams} streams x {a.tokens} tokens: {total:.2f} s, {gen / total:.1f} gen tok/s, {len(steps)} steps")
    pre = [s for s in steps if s[0] > a.streams]
    dec = [s for s in steps if s[0] == a.streams]
    print(f"prefill steps: {len(pre)} ({[s[0] for s in pre]} tokens) {sum(s[1] for s in pre) / 1e3:.2f} s; "
          f"decode steps of {a.streams}: {len(dec)}, {sum(s[1] for s in dec) / 1e3:.2f} s; other steps: "
          f"{len(steps) - len(pre) - len(dec)}, {sum(s[1] for s in steps if s not in pre and s not in dec) / 1e3:.2f} s")
    if a.no_hooks or not dec:
        return
    dec = dec[2:] if len(dec) > 4 else dec  # skip the first decodes (allocation warm-up)
    keys = sorted({k for s in dec for k in s[2]})
    mean = {k: statistics.mean(s[2].get(k, 0.0) for s in dec) for k in keys}
    wall = statistics.mean(s[1] for s in dec)
    qkv_parts = {k: mean[k] for k in ("qkv_mixed", "qkv_tiled", "qkv_plain") if k in mean}
    mean["qkv"] = sum(qkv_parts.values())
    parts = {
        "experts (fused op)": mean.get("experts", 0),
        "routing (softmax, top-k, counts, op glue)": mean.get("moe_block", 0) - mean.get("router", 0) - mean.get("experts", 0),
        "router linear": mean.get("router", 0),
        "attention core (KV write + paged attention)": mean.get("attn_core", 0),
        "qkv": mean.get("qkv", 0),
        "q/k norm": mean.get("qk_norm", 0),
        "o": mean.get("o", 0),
        "attn block rest (split, rotary, reshape)": mean.get("attn_block", 0) - mean.get("qkv", 0) - mean.get("qk_norm", 0)
        - mean.get("attn_core", 0) - mean.get("o", 0),
        "layer norms": mean.get("norms", 0),
        "layers rest (decoder layer glue)": mean.get("forward", 0) - mean.get("attn_block", 0) - mean.get("moe_block", 0)
        - mean.get("norms", 0) - mean.get("final_norm", 0) - mean.get("embed", 0),
        "embed + final norm": mean.get("embed", 0) + mean.get("final_norm", 0),
        "LM head": mean.get("lm_head", 0),
        "outside the model (scheduler, sampler, Python)": wall - mean.get("forward", 0) - mean.get("lm_head", 0),
    }
    print(f"decode step of {a.streams} (mean of {len(dec)}): {wall:.1f} ms; qkv by kind (all layers): "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in qkv_parts.items()))
    for k, v in parts.items():
        print(f"  {k:50s} {v:7.2f} ms  {100 * v / wall:5.1f}%")
    h = collections.Counter(expert_rows)
    n = len(expert_rows)
    print(f"rows per active expert at decode: {n / max(1, len(dec) + 2) / len(model.model.layers):.1f} active experts a"
          f" layer; rows histogram {sorted(h.items())}")


if __name__ == "__main__":
    main()
