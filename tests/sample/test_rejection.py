"""Rejection sampler tests: emitted tokens follow the target distribution; greedy verification."""
from __future__ import annotations

import numpy as np
import torch

from conftest import fits
from tokenmill.sample.logits_processors import apply_sampling_filters
from tokenmill.sample.rejection import rejection_sample, rejection_sample_probs
from tokenmill.sampling_params import SamplingParams

V = 8
LOGITS = torch.tensor([[1.5, 1.0, 0.5, 0.2, 0.0, -0.5, -1.0, -2.0],
                       [0.0, 2.0, 0.3, 1.0, -1.0, 0.5, 0.1, -0.3],
                       [-1.0, 0.0, 1.0, 2.0, 0.5, 0.4, -0.2, 0.0]])
DRAFT = [1, 3]  # plausible but not the most likely tokens


def target_probs(params: SamplingParams) -> np.ndarray:
    return apply_sampling_filters(LOGITS.clone(), [params] * 3).softmax(-1).double().numpy()


def batched_outputs(params: SamplingParams, draft: list[int], n: int = 20_000) -> np.ndarray:
    probs = apply_sampling_filters(LOGITS.clone(), [params] * 3).softmax(-1)  # [3, V]
    d = torch.tensor(draft).expand(n, -1).contiguous()
    out = rejection_sample_probs(probs.expand(n, -1, -1).contiguous(), d, torch.Generator().manual_seed(0))
    return out.numpy()


def check_sequence_distribution(out: np.ndarray, p: np.ndarray, draft: list[int], assert_fits) -> None:
    """Position j, given drafts 0..j-1 were accepted, must be distributed as p[j]."""
    given = np.ones(len(out), dtype=bool)
    for j in range(len(draft) + 1):
        assert (out[given, j] >= 0).all()
        assert_fits(np.bincount(out[given, j], minlength=V), p[j])
        if j < len(draft):
            assert (out[~given, j + 1:] == -1).all() if j + 1 < out.shape[1] else True
            given &= out[:, j] == draft[j]


def test_rejection_matches_target_distribution(assert_fits):
    params = SamplingParams(temperature=0.9)
    out = batched_outputs(params, DRAFT)
    check_sequence_distribution(out, target_probs(params), DRAFT, assert_fits)
    # acceptance rate of the first draft token is p_0(d_0)
    assert abs((out[:, 0] == DRAFT[0]).mean() - target_probs(params)[0, DRAFT[0]]) < 0.015


def test_rejection_with_filters_and_unlikely_draft(assert_fits):
    params = SamplingParams(temperature=1.2, top_k=5, top_p=0.9)
    draft = [7, 3]  # token 7 is filtered out at position 0: never accepted
    out = batched_outputs(params, draft)
    p = target_probs(params)
    assert p[0, 7] == 0 and (out[:, 0] != 7).all()
    assert_fits(np.bincount(out[:, 0], minlength=V), p[0])


def test_wrong_residual_would_be_detected():
    # sampling the recovery token from p itself (not the residual) overweights the draft token
    params = SamplingParams(temperature=0.9)
    p = target_probs(params)
    n = 20_000
    rng = np.random.default_rng(0)
    first = np.where(rng.random(n) < p[0, DRAFT[0]], DRAFT[0], rng.choice(V, size=n, p=p[0]))
    assert not fits(np.bincount(first, minlength=V), p[0])


def test_public_rejection_sample_distribution(assert_fits):
    params = SamplingParams(temperature=0.9)
    g = torch.Generator().manual_seed(1)
    outs = [rejection_sample(LOGITS, DRAFT, params, g) for _ in range(3000)]
    assert all(1 <= len(o) <= 3 for o in outs)
    for o in outs:
        k = next((j for j, t in enumerate(o[:-1]) if t != DRAFT[j]), len(o) - 1)
        assert k == len(o) - 1  # only the last token may differ from the draft
    assert_fits(np.bincount([o[0] for o in outs], minlength=V), target_probs(params)[0])


def test_greedy_verification():
    greedy = SamplingParams(temperature=0.0)
    argmax = LOGITS.argmax(-1).tolist()  # [0, 1, 3]
    assert rejection_sample(LOGITS, argmax[:2], greedy) == argmax  # all accepted + bonus
    assert rejection_sample(LOGITS, [argmax[0], 5], greedy) == [argmax[0], argmax[1]]
    assert rejection_sample(LOGITS, [4, argmax[1]], greedy) == [argmax[0]]
    assert rejection_sample(LOGITS[:1], [], greedy) == [argmax[0]]


def test_penalties_see_draft_history():
    # with a strong repetition penalty, position 1 sees draft token 0 as generated
    x = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    plain = SamplingParams(temperature=0.0)
    assert rejection_sample(x, [0], plain) == [0, 0]
    pen = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert rejection_sample(x, [0], pen) == [0, 1]
    assert rejection_sample(x, [0], pen, output_token_ids=[0]) == [1]


def test_seeded_rejection_is_reproducible():
    params = SamplingParams(temperature=1.0)
    a = [rejection_sample(LOGITS, DRAFT, params, torch.Generator().manual_seed(s)) for s in range(50)]
    b = [rejection_sample(LOGITS, DRAFT, params, torch.Generator().manual_seed(s)) for s in range(50)]
    assert a == b
    assert len({tuple(o) for o in a}) > 3
