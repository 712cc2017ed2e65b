"""What the AMX bf16 tiles made once at load (QuantizedLinear / QuantizedLMHead .pack_amx under gemm auto) cost in
resident memory and buy in decode step time, in one process: loads the model once (the engine's own rule decides
which tiles it makes), prints VmRSS after load and the tiles' bytes by group (attention linears, MLP linears, LM
head), then times decode-only steps of C running requests (200-token prompts, greedy) with each variant's tiles
(made or dropped in place between variants; the variants interleaved over --rounds to cancel the contexts' growth).

    PYTHONPATH=.:bench python bench/cpu_tiles_steps.py --model X.gguf [--kv-cache-memory 4] [--decodes 16,64]
        [--variants all,nohead,noattn,none] [--steps 10] [--rounds 2]

A variant names the groups whose tiles are dropped: all (every uniform packed linear and the head tiled), nohead,
noattn, nomlp, none (no tiles: every AMX call dequantizes its weight).
"""
from __future__ import annotations

import argparse
import statistics
import time

from cpu_batch_steps import _add, _scheduler, _step  # bench/ is on the path when run as a script
from tokenmill.engine.llm import LLM


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _groups(model) -> dict[str, list]:
    from tokenmill.model.layers.quantized import QuantizedLinear, QuantizedLMHead

    out: dict[str, list] = {"attn": [], "mlp": [], "head": []}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLMHead):
            out["head"].append(m)
        elif isinstance(m, QuantizedLinear) and m.qtype != "mixed":
            out["attn" if ".self_attn." in name else "mlp"].append(m)
    return out


def _set_tiles(model, groups: dict[str, list], keep: set[str]) -> None:
    from tokenmill.model.layers.quantized import _glu_sizes
    from tokenmill.ops.cpu.layer import fuse_cpu_layers

    glu = _glu_sizes(model)
    for g, mods in groups.items():
        for m in mods:
            if g in keep and m.qpanels is None:
                m.pack_amx(**({"glu": glu[id(m)]} if id(m) in glu else {}))
            elif g not in keep:
                m.panels = m.qpanels = None
    fuse_cpu_layers(model)  # fused dense layers hold the tiles' pointers


VARIANTS = {"all": {"attn", "mlp", "head"}, "nohead": {"attn", "mlp"}, "noattn": {"mlp", "head"},
            "nomlp": {"attn", "head"}, "none": set()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv-cache-memory", type=float, default=4.0)
    ap.add_argument("--decodes", default="16,64")
    ap.add_argument("--variants", default="all,nohead,noattn,none")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    decodes = [int(v) for v in args.decodes.split(",") if v]
    variants = [v for v in args.variants.split(",") if v]
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    llm = LLM(args.model, enable_prefix_caching=False, num_threads=args.threads, max_num_seqs=max(decodes),
              kv_cache_memory=args.kv_cache_memory)
    core = llm.engine.core
    model = core.runner.model
    rss = _rss_mib()
    groups = _groups(model)
    made = {g: sum(m.panels.numel() * m.panels.element_size() for m in mods if m.panels is not None)
            for g, mods in groups.items()}
    print(f"load {time.perf_counter() - t0:.1f} s; VmRSS before {rss0:.0f} MiB, after load {rss:.0f} MiB; tiles made "
          + ", ".join(f"{g} {b / 2**20:.0f} MiB ({len(groups[g])} modules)" for g, b in made.items()), flush=True)
    for c in decodes:
        sched = _scheduler(core.runner, core.config.scheduler, core.config.cache.block_size)
        _add(sched, c, args.steps * args.rounds * len(variants) + 20, f"d{c}_")
        while True:  # prefill until every request decodes
            n, _ = _step(sched, core.runner)
            if len(n) == c and all(v == 1 for v in n.values()):
                break
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                _set_tiles(model, groups, VARIANTS[v])
                _step(sched, core.runner)  # warm-up after the change
                for _ in range(args.steps):
                    n, dt = _step(sched, core.runner)
                    times[v].append(dt * 1e3)
        for v in variants:
            print(f"{c} decodes, tiles {v:7s}: p50 {statistics.median(times[v]):6.1f} ms, min {min(times[v]):6.1f} ms "
                  f"({len(times[v])} steps)", flush=True)
        del sched
    _set_tiles(model, groups, set())
    print(f"VmRSS with every tile dropped: {_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
