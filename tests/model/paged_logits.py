"""Logits through the paged KV cache against a reference model's, shared by the model tests (test_model_vs_hf,
test_deepseek): scattered block tables, one engine step's forward, and the prefill / batched-decode and
chunked-prefill-mixed-with-decode scenarios."""
from __future__ import annotations

import math

import torch

from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.worker.forward_batch import build_forward_batch

PROMPT_LENS = [5, 11, 17]
DECODE_STEPS = 3
BLOCK_SIZE = 4
NUM_BLOCKS = 24
TOL = 1e-4


def sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n + DECODE_STEPS,), generator=g).tolist() for n in PROMPT_LENS]


def block_tables(seqs: list[list[int]]) -> list[list[int]]:
    """Scattered, shuffled block ids per request (never contiguous, never sorted)."""
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(2)).tolist()
    tables, pos = [], 0
    for s in seqs:
        n = math.ceil(len(s) / BLOCK_SIZE)
        tables.append(perm[pos:pos + n])
        pos += n
    return tables


def new_cache(model) -> list:
    return allocate_kv_cache(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                             torch.float32, "cpu")


def run(model, kv, tables, chunks: list[list[int]], done: list[int]) -> torch.Tensor:
    """One engine step: chunks[i] are request i's new tokens after done[i] cached ones; logits of every token."""
    batch = build_forward_batch(chunks, done, tables, BLOCK_SIZE, logits_for="all")
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.positions, kv, batch)
        return model.compute_logits(hidden[batch.logits_indices])


def check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff < TOL, f"max abs diff {diff}"


def prefill_then_batched_decode(model, seqs: list[list[int]], ref: list[torch.Tensor]) -> None:
    """All prompts in one step, then DECODE_STEPS steps decoding every request together."""
    kv, tables = new_cache(model), block_tables(seqs)
    logits = run(model, kv, tables, [s[:n] for s, n in zip(seqs, PROMPT_LENS)], [0] * len(seqs))
    start = 0
    for i, n in enumerate(PROMPT_LENS):
        check(logits[start:start + n], ref[i][:n])
        start += n
    for step in range(DECODE_STEPS):
        done = [n + step for n in PROMPT_LENS]
        logits = run(model, kv, tables, [[s[d]] for s, d in zip(seqs, done)], done)
        for i, d in enumerate(done):
            check(logits[i], ref[i][d])


def chunked_prefill_mixed_with_decode(model, seqs: list[list[int]], ref: list[torch.Tensor]) -> None:
    """Chunks of 3 prompt tokens per step; requests that finished their prompt decode in the same batch."""
    kv, tables = new_cache(model), block_tables(seqs)
    done = [0] * len(seqs)
    steps = 0
    while any(d < len(s) for d, s in zip(done, seqs)):
        active = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        chunks = [seqs[i][done[i]:done[i] + (3 if done[i] < PROMPT_LENS[i] else 1)] for i in active]
        logits = run(model, kv, [tables[i] for i in active], chunks, [done[i] for i in active])
        start = 0
        for i, chunk in zip(active, chunks):
            check(logits[start:start + len(chunk)], ref[i][done[i]:done[i] + len(chunk)])
            start += len(chunk)
            done[i] += len(chunk)
        steps += 1
    assert steps > max(PROMPT_LENS) // 3  # really chunked
