"""moe_offload (optional step): expert offload on the Mixtral-8x7B shape, 4 of its 32 layers (bench/moe_offload.py):
batch-1 decode with half the experts cached on the GPU, with prefetch, and with every expert on the CPU. Four
layers keep the random-weight load inside the step's limit (the experts are built in host memory); each layer
costs the same, so the ratios hold for 32. The dry run: a tiny Mixtral on the CPU with a simulated pool."""
from __future__ import annotations

from bench.gpu_suite.common import Ctx, Step, row

FULL_LAYERS, FULL_NEW = 4, 48
DRY_NEW = 6


def run_moe_offload(ctx: Ctx, step: Step) -> None:
    from bench.moe_offload import run

    layers, new, prompt = (None, DRY_NEW, 8) if ctx.dry else (FULL_LAYERS, FULL_NEW, 32)
    with step.guard("expert offload"):
        res = run(layers, batch=1, prompt=prompt, new=new, dry=ctx.dry, seed=ctx.seed)
        step.details["moe_offload"] = res
        base = res["runs"]["all_experts_on_cpu"]["decode_tokens_per_s"]
        for name, r in res["runs"].items():
            shape = "tiny Mixtral" if ctx.dry else "Mixtral-8x7B shape"
            what = f"{shape} ({res['layers']} layers) batch-1 decode, {name.replace('_', ' ')}"
            note = f"hit rate {r['hit_rate']:.2f}, host pairs {r['cache']['host_tokens']}, " \
                   f"fetches {r['cache']['fetches']}, prefetches {r['cache']['prefetches']}"
            if name == "all_experts_on_cpu":
                step.add(row(what, r["decode_tokens_per_s"], "tok/s", note=note))
            else:
                step.add(row(what, r["decode_tokens_per_s"], "tok/s", ref=base, ref_label="all experts on CPU",
                             target=1.0, note=note))
