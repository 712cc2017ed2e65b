"""Our model through the paged KV cache vs transformers on tiny random models: prefill, chunked prefill, decode."""
from __future__ import annotations

import math

import pytest
import torch

from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source
from tokenmill.ops.attention.backend import ReferenceAttentionBackend
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.worker.forward_batch import build_forward_batch

PROMPT_LENS = [5, 11, 17]
DECODE_STEPS = 3
BLOCK_SIZE = 4
NUM_BLOCKS = 24
TOL = 1e-4


def _sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n + DECODE_STEPS,), generator=g).tolist() for n in PROMPT_LENS]


def _block_tables(seqs: list[list[int]]) -> list[list[int]]:
    """Scattered, shuffled block ids per request (never contiguous, never sorted)."""
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(2)).tolist()
    tables, pos = [], 0
    for s in seqs:
        n = math.ceil(len(s) / BLOCK_SIZE)
        tables.append(perm[pos:pos + n])
        pos += n
    return tables


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "qwen3", "smollm", "mixtral", "qwen2_moe",
                                              "qwen3_moe", "olmoe"])
def models(request, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs[request.param]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    source = resolve_model_source(path)
    ours = load_model(source, load_hf_config(source), torch.float32, "cpu")
    seqs = _sequences(hf.config.vocab_size)
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0] for s in seqs]  # [L, V] per sequence
    return ours, seqs, ref


def _run(model, kv, tables, chunks: list[list[int]], done: list[int]) -> torch.Tensor:
    """One engine step: chunks[i] are request i's new tokens after done[i] cached ones; logits of every token."""
    batch = build_forward_batch(chunks, done, tables, BLOCK_SIZE, logits_for="all")
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.positions, kv, batch)
        return model.compute_logits(hidden[batch.logits_indices])


def _new_cache(model):
    return allocate_kv_cache(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                             torch.float32, "cpu")


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff < TOL, f"max abs diff {diff}"


def test_prefill_then_batched_decode(models):
    model, seqs, ref = models
    kv, tables = _new_cache(model), _block_tables(seqs)
    logits = _run(model, kv, tables, [s[:n] for s, n in zip(seqs, PROMPT_LENS)], [0] * len(seqs))
    start = 0
    for i, n in enumerate(PROMPT_LENS):
        _check(logits[start:start + n], ref[i][:n])
        start += n
    for step in range(DECODE_STEPS):
        done = [n + step for n in PROMPT_LENS]
        logits = _run(model, kv, tables, [[s[d]] for s, d in zip(seqs, done)], done)
        for i, d in enumerate(done):
            _check(logits[i], ref[i][d])


def test_chunked_prefill_mixed_with_decode(models):
    """Chunks of 3 prompt tokens per step; requests that finished their prompt decode in the same batch."""
    model, seqs, ref = models
    kv, tables = _new_cache(model), _block_tables(seqs)
    done = [0] * len(seqs)
    steps = 0
    while any(d < len(s) for d, s in zip(done, seqs)):
        active = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        chunks = [seqs[i][done[i]:done[i] + (3 if done[i] < PROMPT_LENS[i] else 1)] for i in active]
        logits = _run(model, kv, [tables[i] for i in active], chunks, [done[i] for i in active])
        start = 0
        for i, chunk in zip(active, chunks):
            _check(logits[start:start + len(chunk)], ref[i][done[i]:done[i] + len(chunk)])
            start += len(chunk)
            done[i] += len(chunk)
        steps += 1
    assert steps > max(PROMPT_LENS) // 3  # really chunked


def test_attention_backend_is_pluggable(models):
    model, seqs, ref = models

    class Counting(ReferenceAttentionBackend):
        calls = 0

        def forward(self, *args):
            Counting.calls += 1
            return super().forward(*args)

    model.set_attention_backend(Counting())
    try:
        kv, tables = _new_cache(model), _block_tables(seqs)
        logits = _run(model, kv, tables[:1], [seqs[0]], [0])
        _check(logits, ref[0])
        assert Counting.calls == model.num_layers
    finally:
        model.set_attention_backend(ReferenceAttentionBackend())


def test_window_and_model_attributes(models):
    model, seqs, _ = models
    assert model.vocab_size == 512
    windows = set(model.sliding_windows)
    assert windows == ({8} if model.config.model_type == "mistral" else {None})
