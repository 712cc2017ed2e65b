"""The grammar-bitmask stage against its plain-Python reference, on random logits and random masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.sample.grammar_mask import apply_token_bitmask_, apply_token_bitmask_reference, unpack_bitmask


def _random_case(rows: int, vocab: int, n_logits: int, seed: int):
    g = np.random.default_rng(seed)
    words = (vocab + 31) // 32
    bm = g.integers(-(1 << 31), 1 << 31, size=(rows, words), dtype=np.int64).astype(np.int32)
    bm[0, :] = 0  # a row allowing only a few tokens
    bm[0, 1] = np.uint32(1 << 31 | 1 << 3).view(np.int32)  # tokens 63 and 35 (the sign bit is a token too)
    logits = torch.randn(n_logits, vocab, generator=torch.Generator().manual_seed(seed))
    sel = sorted(g.choice(n_logits, size=rows, replace=False).tolist())
    return bm, logits, sel


@pytest.mark.parametrize("vocab", [64, 100, 333])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_mask_matches_reference(vocab, as_tensor):
    bm, logits, rows = _random_case(3, vocab, 5, seed=vocab)
    ref = apply_token_bitmask_reference(logits, bm, rows)
    out = apply_token_bitmask_(logits.clone(), torch.from_numpy(bm) if as_tensor else bm, rows)
    assert torch.equal(out, ref)
    untouched = [r for r in range(5) if r not in rows]
    assert torch.equal(out[untouched], logits[untouched])
    assert set(torch.nonzero(torch.isfinite(out[rows[0]])).flatten().tolist()) == {35, 63}


def test_torch_and_numpy_unpacking_agree():
    bm, _, _ = _random_case(4, 200, 5, seed=1)
    a = unpack_bitmask(bm, 200)
    b = unpack_bitmask(torch.from_numpy(bm), 200)
    assert torch.equal(a, b)


def test_logits_wider_than_the_mask_disallow_the_extra_ids():
    bm = np.full((1, 2), -1, dtype=np.int32)  # 64 tokens allowed
    logits = torch.randn(1, 70)
    out = apply_token_bitmask_(logits.clone(), bm, [0])
    assert torch.isfinite(out[0, :64]).all() and torch.isinf(out[0, 64:]).all()
    assert torch.equal(out, apply_token_bitmask_reference(logits, bm, [0]))


def test_greedy_after_mask_picks_the_best_allowed_token():
    logits = torch.tensor([[5.0, 1.0, 3.0, 4.0]])
    bm = np.array([[0b0110]], dtype=np.int32)  # tokens 1 and 2
    assert apply_token_bitmask_(logits, bm, [0]).argmax(dim=-1).item() == 2
