"""Our model through the paged KV cache vs transformers on tiny random models: prefill, chunked prefill, decode."""
from __future__ import annotations

import pytest
import torch

from tests.model.paged_logits import (block_tables as _block_tables, check as _check,
                                      chunked_prefill_mixed_with_decode, new_cache as _new_cache,
                                      prefill_then_batched_decode, run as _run, sequences as _sequences)
from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source
from tokenmill.ops.attention.backend import ReferenceAttentionBackend


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


def test_prefill_then_batched_decode(models):
    prefill_then_batched_decode(*models)


def test_chunked_prefill_mixed_with_decode(models):
    chunked_prefill_mixed_with_decode(*models)


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
