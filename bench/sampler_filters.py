"""Sampling step cost by filter on a real model's next-token distributions: the fused CPU sampler (csrc/sampler.c)
against the PyTorch path (apply_sampling_filters + softmax + inverse CDF; `Sampler(fused_cpu=False)`), in one run.
The rows are SmolLM2-135M-Instruct's logits over 200 positions of a sampled story (transformers on an HF folder),
so top-p / top-k see the nucleus sizes a user's requests do (T=1, p=0.95: median ~50 tokens, p99 ~1300).

    PYTHONPATH=. python bench/sampler_filters.py [--model /tmp/vllmcpu/smollm2-hf] [--rows 16,64] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from tokenmill.sample.sampler import Sampler, SamplingBatch
from tokenmill.sampling_params import SamplingParams

from cpu_gemm import timeit  # median seconds of fn after a warm-up (bench/ is on the path when run as a script)

CONFIGS = [("greedy", dict(temperature=0.0)), ("T=1", dict(temperature=1.0)),
           ("T=0.7 top_p=0.9", dict(temperature=0.7, top_p=0.9)), ("T=1 top_p=0.95", dict(temperature=1.0, top_p=0.95)),
           ("T=0.8 top_k=50", dict(temperature=0.8, top_k=50)), ("T=1 min_p=0.05", dict(temperature=1.0, min_p=0.05))]


def real_logits(model: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    msgs = [{"role": "user", "content": "Write a short story about a robot who learns to paint, with vivid detail."}]
    ids = torch.tensor([tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)])
    torch.manual_seed(0)
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=200, do_sample=True, temperature=0.8, top_p=0.95)
        return m(out).logits[0, ids.shape[1] - 1:-1].float().contiguous()


def median_ms(fn, iters: int = 15) -> float:
    return timeit(fn, iters) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/vllmcpu/smollm2-hf")
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logits = real_logits(args.model)
    fused, ref = Sampler(seed=0), Sampler(seed=0, fused_cpu=False)
    print(f"{'rows':>5} {'sampling':<18} {'fused C ms':>11} {'PyTorch ms':>11} {'speed-up':>9}")
    for b in (int(x) for x in args.rows.split(",")):
        rows = logits[torch.arange(b) % logits.shape[0]].contiguous()
        for name, kw in CONFIGS:
            batch = SamplingBatch([SamplingParams(max_tokens=4, **kw)] * b, [[1]] * b, [[2]] * b, [()] * b, [None] * b)
            f, r = median_ms(lambda: fused(rows, batch)), median_ms(lambda: ref(rows, batch))
            print(f"{b:>5} {name:<18} {f:>11.2f} {r:>11.2f} {r / f:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
