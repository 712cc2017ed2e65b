"""Steps against transformers: `hf_equal` (greedy tokens of tokenmill and transformers on the same random weights,
Llama-3.2-1B shape, bf16), `hf_peer` (transformers `generate` beside tokenmill on the 1B shape, batch 1 and
batched) and `hf_8b` (transformers batch-1 on the 8B shape, run only when time is left)."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

from bench.gpu_suite.common import (HF_8B_ANCHORS, Ctx, Step, build_llm, generate_throughput, load_config,
                                    model_folder, random_prompts, release, row, sync)
from bench.gpu_suite.sizes import Sizes


def build_hf(ctx: Ctx, folder: str, seed: int = 0) -> Any:
    """transformers *ForCausalLM of folder's config: random init on the device, sdpa attention, EOS off
    (both engines then generate exactly the asked number of tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    dtype = getattr(torch, ctx.dtype)
    with torch.device(ctx.device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers before `dtype` replaced `torch_dtype`
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    model.to(ctx.device).eval()  # a no-op when the device context placed it already
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model: Any, prompt: list[int], new: int) -> dict[str, Any]:
    """Greedy tokens of one prompt with, per step, the top-2 raw logits and the chosen token's logprob."""
    import torch

    dev = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=dev)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[0, len(prompt):].tolist()
    top2, lps = [], []
    for t, logits in zip(toks, out.logits):
        lg = logits[0].float()
        v, i = torch.topk(lg, 2)
        top2.append((i.tolist(), v.tolist()))
        lps.append(float(torch.log_softmax(lg, -1)[t]))
    return {"tokens": toks, "top2": top2, "logprobs": lps}


def bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers at |x| (8 significant bits): a logit gap of one ulp is a rounding tie."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


def compare_greedy(tm_tokens: list[int], tm_logprobs: Optional[list[Any]], hf: dict[str, Any], min_match: int,
                   tie_tol: float) -> dict[str, Any]:
    """First divergence of tokenmill's greedy tokens from transformers'; allowed only at or after min_match tokens
    and only where transformers' top-2 logits are within tie_tol and tokenmill chose one of those two."""
    n = min(len(tm_tokens), len(hf["tokens"]))
    first = next((i for i in range(n) if tm_tokens[i] != hf["tokens"][i]), None)
    lp_diff = None
    if tm_logprobs:
        upto = n if first is None else first
        diffs = [abs(tm_logprobs[i].logprob - hf["logprobs"][i]) for i in range(upto) if tm_logprobs[i] is not None]
        lp_diff = max(diffs) if diffs else None
    out: dict[str, Any] = {"compared": n, "first_divergence": first, "max_logprob_diff": lp_diff}
    if first is None:
        out["ok"] = n == len(hf["tokens"]) == len(tm_tokens)
        return out
    ids, vals = hf["top2"][first]
    gap = vals[0] - vals[1]
    out.update(hf_top2_gap=gap, hf_top1_logit=vals[0], tokenmill_token=tm_tokens[first], hf_token=hf["tokens"][first],
               hf_top2_gap_bf16_ulps=gap / bf16_ulp(vals[0]))
    if tm_logprobs and tm_logprobs[first] is not None and len(tm_logprobs[first].top) >= 2:
        top = tm_logprobs[first].top
        out["tokenmill_top2_gap"] = top[0][1] - top[1][1]
    out["ok"] = first >= min_match and gap <= tie_tol and tm_tokens[first] in ids
    return out


def run_hf_equal(ctx: Ctx, step: Step, sz: Sizes) -> None:
    """Greedy equality in the run's dtype (bf16 on the device), then in float32 on the same weights (the bf16
    checkpoint upcast on both sides): a bf16-only divergence at a small gap is rounding, one in float32 a bug."""
    cfg = load_config("1b", ctx.dry)
    vocab = int(cfg["vocab_size"])
    folder = model_folder(cfg)
    prompts = [random_prompts(1, n, vocab, ctx.seed + 10 + i)[0] for i, n in enumerate(sz.eq_prompt_lens)]
    dtypes = (ctx.dtype, "float32")
    hf_out: dict[str, list[dict[str, Any]]] = {}
    model = None
    with step.guard("transformers greedy"):
        model = build_hf(ctx, folder, ctx.seed)
        t = time.perf_counter()
        model.save_pretrained(folder)  # the same weights for tokenmill, through its safetensors loader
        step.details["save_s"] = time.perf_counter() - t
        for dt in dtypes:
            model = model.float() if dt == "float32" else model
            hf_out[dt] = [hf_greedy(model, p, sz.eq_new) for p in prompts]
    model = None
    release()
    for dt in dtypes:
        if dt in hf_out:
            with step.guard(f"tokenmill greedy {dt}"):
                _tokenmill_vs_hf(ctx, step, sz, folder, prompts, hf_out[dt], dt)


def _tokenmill_vs_hf(ctx: Ctx, step: Step, sz: Sizes, folder: str, prompts: list[list[int]],
                     hf_out: list[dict[str, Any]], dtype: str) -> None:
    from tokenmill import SamplingParams

    llm, fb = build_llm(ctx, step, f"1B engine {dtype}", folder, load_format="safetensors", dtype=dtype,
                        max_model_len=max(sz.eq_prompt_lens) + sz.eq_new + 16, max_num_seqs=len(prompts))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=sz.eq_new, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    llm = None
    release()
    results = [compare_greedy(list(o.outputs[0].token_ids), o.outputs[0].logprobs, h, sz.eq_min_match,
                              sz.eq_tie_tol) for o, h in zip(outs, hf_out)]
    step.details[f"prompts_{dtype}"] = [{"prompt_len": len(p), **r} for p, r in zip(prompts, results)]
    ok = sum(1 for r in results if r["ok"])
    firsts = ", ".join("all" if r["first_divergence"] is None else
                       f"{r['first_divergence']} (HF top-2 gap {r['hf_top2_gap']:.3g} = "
                       f"{r['hf_top2_gap_bf16_ulps']:.1f} bf16 ulp)" for r in results)
    step.add(row(f"greedy tokens equal to transformers ({len(prompts)} prompts x {sz.eq_new}, {dtype})", ok,
                 "prompts", ref=len(prompts), ref_label="prompts compared", target=1.0,
                 note=f"first divergence: {firsts}{fb}"))
    diffs = [r["max_logprob_diff"] for r in results if r["max_logprob_diff"] is not None]
    if diffs:
        step.add(row(f"max abs logprob difference of the agreed tokens ({dtype})", max(diffs), "nats"))


def hf_generate_timing(model: Any, prompts: list[list[int]], new: int, batch: int) -> dict[str, Any]:
    """transformers generate, greedy, exactly `new` tokens per prompt, `batch` prompts per call (equal lengths:
    no padding); time after a short warm-up."""
    import torch

    dev = next(model.parameters()).device
    gen = dict(max_new_tokens=new, do_sample=False)
    with torch.inference_mode():
        warm = torch.tensor([prompts[0][:16]], device=dev)
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        sync()
        t = time.perf_counter()
        produced = 0
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device=dev)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
            produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        sync()
        dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    return {"seconds": dt, "output_tokens": produced, "output_tokens_per_s": produced / dt, "batch": batch,
            "peak_gb": peak}


def run_hf_peer(ctx: Ctx, step: Step, sz: Sizes) -> None:
    cfg = load_config("1b", ctx.dry)
    vocab = int(cfg["vocab_size"])
    folder = model_folder(cfg)
    b1 = random_prompts(1, sz.peer_b1_prompt, vocab, ctx.seed + 20)
    batched = random_prompts(sz.peer_requests, sz.peer_prompt, vocab, ctx.seed + 21)
    hf: dict[str, Any] = {}
    tm: dict[str, Any] = {}
    step.details.update(transformers=hf, tokenmill=tm)
    model = None
    with step.guard("transformers generate"):
        model = build_hf(ctx, folder, ctx.seed)
        hf["batch1"] = hf_generate_timing(model, b1, sz.peer_b1_new, 1)
        hf["batched"] = hf_generate_timing(model, batched, sz.peer_new, sz.peer_hf_batch)
    model = None
    release()
    with step.guard("tokenmill generate"):
        llm, fb = build_llm(ctx, step, "1B engine", folder, max_model_len=sz.peer_max_model_len,
                            max_num_seqs=sz.peer_requests, max_num_batched_tokens=sz.max_batched_tokens)
        tm["fallback"] = fb
        generate_throughput(llm, random_prompts(4, 48, vocab, ctx.seed + 99), 6)  # warm-up
        tm["batch1"] = generate_throughput(llm, b1, sz.peer_b1_new)
        tm["batched"] = generate_throughput(llm, batched, sz.peer_new)
        llm = None
        release()
    for key, label in (("batch1", f"batch 1, {sz.peer_b1_prompt}/{sz.peer_b1_new}"),
                       ("batched", f"{sz.peer_requests} x {sz.peer_prompt}/{sz.peer_new}")):
        if key in tm and key in hf:
            step.add(row(f"1B shape {label}: tokenmill vs transformers", tm[key]["output_tokens_per_s"], "tok/s",
                         ref=hf[key]["output_tokens_per_s"],
                         ref_label=f"transformers generate (batch {hf[key]['batch']})",
                         note="end to end, prefill included"))


def run_hf_8b(ctx: Ctx, step: Step, sz: Sizes) -> None:
    cfg = load_config("8b", ctx.dry)
    folder = model_folder(cfg)
    prompts = random_prompts(1, sz.hf8b_prompt, int(cfg["vocab_size"]), ctx.seed + 30)
    model = None
    with step.guard("transformers 8B batch 1"):
        model = build_hf(ctx, folder, ctx.seed)
        r = hf_generate_timing(model, prompts, sz.hf8b_new, 1)
        step.details["batch1"] = r
        ours = _tokenmill_batch1(ctx.work)
        step.add(row(f"transformers 8B batch 1, {sz.hf8b_prompt}/{sz.hf8b_new}", r["output_tokens_per_s"], "tok/s",
                     ref=HF_8B_ANCHORS["batch1_128_128"], ref_label="same, 128/128, H100 (ANCHORS)",
                     note=f"tokenmill batch-1 decode this run: {ours:.1f} tok/s" if ours else ""))
    model = None
    release()


def _tokenmill_batch1(work: str) -> Optional[float]:
    try:
        with open(os.path.join(work, "llama8b.json")) as f:
            return float(json.load(f)["details"]["batch1"]["decode_tokens_per_s"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
