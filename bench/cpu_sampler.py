"""Sampling step cost on the CPU: tokenmill's sampler (inverse CDF, one uniform a row) vs the exponential race
it replaced (argmax(p / q), q ~ Exp(1): V draws a row through torch's exponential_) vs torch.multinomial, for a
SmolLM2-sized vocabulary, by rows sampled per step. With --no-tune-allocator glibc's default malloc thresholds
stay (every step's few-MiB tensors are then page-faulted in anew; see tokenmill/ops/cpu/host.py).

    PYTHONPATH=. python bench/cpu_sampler.py [--rows 1,6,16,64] [--vocab 49152] [--threads 2] [--no-tune-allocator]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tokenmill.ops.cpu.host import tune_allocator
from tokenmill.sample.logits_processors import apply_sampling_filters
from tokenmill.sample.sampler import Sampler, SamplingBatch
from tokenmill.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_gemm import timeit as _median_s  # noqa: E402


def timeit(fn, iters: int = 30) -> float:
    """Median ms of fn over iters calls (after one warm-up)."""
    return _median_s(fn, iters) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,6,16,64")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--no-tune-allocator", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_allocator else tune_allocator()
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(seed=0)
    print(f"vocab {args.vocab}, threads {args.threads}, temperature {args.temperature}, allocator tuned: {tuned}")
    print(f"{'rows':>5} {'tokenmill ms':>13} {'exp race ms':>12} {'multinomial ms':>15} {'greedy ms':>10}")
    for b in (int(x) for x in args.rows.split(",")):
        logits = torch.randn(b, args.vocab, generator=gen) * 3
        params = [SamplingParams(temperature=args.temperature, max_tokens=16) for _ in range(b)]
        batch = SamplingBatch(params, [[1, 2, 3]] * b, [[4]] * b, [(2,)] * b, [None] * b)
        greedy = SamplingBatch([SamplingParams(temperature=0.0, max_tokens=16)] * b, [[1, 2, 3]] * b, [[4]] * b,
                               [(2,)] * b, [None] * b)

        def race() -> torch.Tensor:  # the replaced method, same filters and softmax in front of it
            probs = apply_sampling_filters(logits.clone(), params).softmax(dim=-1)
            q = torch.empty_like(probs).exponential_(generator=gen).clamp_(min=torch.finfo(probs.dtype).tiny)
            return (probs / q).argmax(dim=-1)

        def multinomial() -> torch.Tensor:
            probs = apply_sampling_filters(logits.clone(), params).softmax(dim=-1)
            return torch.multinomial(probs, 1, generator=gen)

        print(f"{b:>5} {timeit(lambda: sampler(logits, batch)):>13.2f} {timeit(race):>12.2f} "
              f"{timeit(multinomial):>15.2f} {timeit(lambda: sampler(logits, greedy)):>10.2f}", flush=True)


if __name__ == "__main__":
    main()
