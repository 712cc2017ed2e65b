"""A random paged batch for attention-kernel tests (shared by the CPU and Triton kernel tests)."""
from __future__ import annotations

import random

from tokenmill.worker.forward_batch import ForwardBatch, build_forward_batch


def random_paged_batch(reqs: list[tuple[int, int]], block_size: int, num_blocks: int, seed: int,
                       device: str = "cpu") -> ForwardBatch:
    """reqs: (tokens already cached, tokens computed now); blocks drawn at random from the pool."""
    rng = random.Random(seed)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, toks, done = [], [], []
    for cached, new in reqs:
        tables.append([pool.pop() for _ in range(-(-(cached + new) // block_size))])
        toks.append([rng.randrange(100) for _ in range(new)])
        done.append(cached)
    return build_forward_batch(toks, done, tables, block_size, device=device)
