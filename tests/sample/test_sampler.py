"""Sampler tests: distributions (chi-square), greedy, penalties, bias, min_tokens, seeds, logprobs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fits
from tokenmill.core.outputs import Logprob
from tokenmill.sample.logits_processors import apply_penalties_and_bias
from tokenmill.sample.sampler import Sampler, SamplingBatch, make_request_generator
from tokenmill.sampling_params import SamplingParams

V = 12
N = 20_000
BASE = np.array([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.3, 0.0, -0.4, -0.8, -1.5, -3.0])


def make_batch(params: list[SamplingParams], prompts=None, outputs=None, eos=None, gens=None) -> SamplingBatch:
    b = len(params)
    return SamplingBatch(params=params,
                         prompt_token_ids=prompts if prompts is not None else [[] for _ in range(b)],
                         output_token_ids=outputs if outputs is not None else [[] for _ in range(b)],
                         eos_token_ids=eos if eos is not None else [() for _ in range(b)],
                         generators=gens if gens is not None else [None] * b)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def sample_counts(params: SamplingParams, logits: np.ndarray = BASE, n: int = N, seed: int = 0) -> np.ndarray:
    rows = torch.tensor(logits, dtype=torch.float32).expand(n, -1).contiguous()
    out = Sampler(seed=seed)(rows, make_batch([params] * n))
    return np.bincount(np.array(out.token_ids), minlength=len(logits))


# ---- reference distributions written independently of the sampler (loops over a tiny vocab) ----

def ref_top_k(p: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-p)[:k]
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


def ref_top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    q = np.zeros_like(p)
    mass = 0.0
    for i in np.argsort(-p):  # smallest prefix (by descending prob) whose mass reaches top_p
        q[i] = p[i]
        mass += p[i]
        if mass >= top_p:
            break
    return q / q.sum()


def ref_min_p(p: np.ndarray, min_p: float) -> np.ndarray:
    q = np.where(p >= min_p * p.max(), p, 0.0)
    return q / q.sum()


# ---- distributions ----

def test_temperature_distribution(assert_fits):
    assert_fits(sample_counts(SamplingParams(temperature=0.7)), softmax(BASE / 0.7))
    assert_fits(sample_counts(SamplingParams(temperature=1.6)), softmax(BASE / 1.6))


def test_chi_square_detects_wrong_temperature():
    counts = sample_counts(SamplingParams(temperature=1.0))
    assert fits(counts, softmax(BASE))
    assert not fits(counts, softmax(BASE / 0.9))


def test_top_k_distribution(assert_fits):
    assert_fits(sample_counts(SamplingParams(top_k=4)), ref_top_k(softmax(BASE), 4))
    assert_fits(sample_counts(SamplingParams(top_k=1, temperature=0.5)), ref_top_k(softmax(BASE), 1))


def test_top_p_distribution(assert_fits):
    p = softmax(BASE)
    assert_fits(sample_counts(SamplingParams(top_p=0.6)), ref_top_p(p, 0.6))
    assert_fits(sample_counts(SamplingParams(top_p=0.9)), ref_top_p(p, 0.9))


def test_min_p_distribution(assert_fits):
    assert_fits(sample_counts(SamplingParams(min_p=0.3)), ref_min_p(softmax(BASE), 0.3))


def test_combined_filters_distribution(assert_fits):
    # temperature -> min_p -> top_k -> top_p, each renormalizing
    params = SamplingParams(temperature=1.3, min_p=0.1, top_k=7, top_p=0.8)
    p = softmax(BASE / 1.3)
    expected = ref_top_p(ref_top_k(ref_min_p(p, 0.1), 7), 0.8)
    assert_fits(sample_counts(params), expected)


def test_mixed_batch_rows_use_their_own_params(assert_fits):
    n = 8000
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0.5), SamplingParams(temperature=0.0)] * n
    rows = torch.tensor(BASE, dtype=torch.float32).expand(len(params), -1).contiguous()
    toks = np.array(Sampler(seed=1)(rows, make_batch(params)).token_ids).reshape(n, 3)
    assert_fits(np.bincount(toks[:, 0], minlength=V), ref_top_k(softmax(BASE), 3))
    assert_fits(np.bincount(toks[:, 1], minlength=V), softmax(BASE / 0.5))
    assert (toks[:, 2] == 0).all()


# ---- greedy ----

def test_greedy_equals_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=g)
    expected = logits.argmax(-1).tolist()
    s = Sampler()
    assert s(logits, make_batch([SamplingParams(temperature=0.0)] * 64)).token_ids == expected  # fast path
    with_lp = [SamplingParams(temperature=0.0, logprobs=2)] * 64
    assert s(logits, make_batch(with_lp)).token_ids == expected  # full path
    mixed = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.0) for i in range(64)]
    got = s(logits, make_batch(mixed)).token_ids
    assert got[1::2] == expected[1::2]
    assert got[0::2] != expected[0::2]  # sampled rows over a 1000-token vocabulary


# ---- penalties, bias, min_tokens (hand-computed) ----

def _process(params: SamplingParams, logits: list[float], prompt: list[int], output: list[int],
             eos: tuple[int, ...] = ()) -> list[float]:
    x = torch.tensor([logits], dtype=torch.float32)
    return apply_penalties_and_bias(x, [params], [prompt], [output], [eos])[0].tolist()


def test_repetition_penalty_hand_computed():
    logits = [2.0, -1.0, 3.0, -2.0, 1.0]
    got = _process(SamplingParams(repetition_penalty=2.0), logits, prompt=[0, 1], output=[3, 3])
    # seen (prompt + output) = {0, 1, 3}: positive divided, negative multiplied
    assert got == pytest.approx([1.0, -2.0, 3.0, -4.0, 1.0])
    got = _process(SamplingParams(repetition_penalty=0.5), logits, prompt=[2], output=[])
    assert got == pytest.approx([2.0, -1.0, 6.0, -2.0, 1.0])


def test_presence_and_frequency_penalties_hand_computed():
    logits = [2.0, -1.0, 3.0, -2.0, 1.0]
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)
    got = _process(params, logits, prompt=[0, 0, 4], output=[2, 2, 2, 3])
    # prompt tokens are not penalized; token 2: 3 - 0.5*3 - 1 = 0.5; token 3: -2 - 0.5 - 1 = -3.5
    assert got == pytest.approx([2.0, -1.0, 0.5, -3.5, 1.0])
    got = _process(SamplingParams(presence_penalty=-0.5), logits, prompt=[], output=[1, 1])
    assert got == pytest.approx([2.0, -0.5, 3.0, -2.0, 1.0])


def test_all_penalties_in_vllm_order():
    logits = [2.0, -1.0, 3.0, -2.0, 1.0]
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={4: 1.0, 1: 3.0})
    got = _process(params, logits, prompt=[4], output=[1, 1])
    # bias first: [2, 2, 3, -2, 2]; repetition on {4, 1}: [2, 1, 3, -2, 1];
    # then token 1 (count 2): 1 - 0.25*2 - 0.5 = 0
    assert got == pytest.approx([2.0, 0.0, 3.0, -2.0, 1.0])


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    s = Sampler()
    assert s(logits, make_batch([SamplingParams(temperature=0)], outputs=[[0]])).token_ids == [0]
    p = SamplingParams(temperature=0, frequency_penalty=0.2)
    assert s(logits, make_batch([p], outputs=[[0]])).token_ids == [1]
    p = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert s(logits, make_batch([p], prompts=[[0]])).token_ids == [1]


def test_logit_bias():
    logits = [2.0, -1.0, 3.0, -2.0, 1.0]
    got = _process(SamplingParams(logit_bias={0: -2.5, 3: 10.0}), logits, prompt=[], output=[])
    assert got == pytest.approx([-0.5, -1.0, 3.0, 8.0, 1.0])
    s = Sampler()
    x = torch.tensor([logits] * 2)
    params = [SamplingParams(temperature=0, logit_bias={3: 10.0}), SamplingParams(temperature=0)]
    assert s(x, make_batch(params)).token_ids == [3, 2]
    # -100 bias effectively bans a token when sampling
    params = [SamplingParams(temperature=1.0, logit_bias={2: -100.0})] * 2000
    toks = s(torch.tensor([logits] * 2000), make_batch(params)).token_ids
    assert 2 not in toks


def test_min_tokens_bans_eos_and_stop_ids():
    logits = [5.0, 1.0, 4.0, 0.0, 3.0]
    params = SamplingParams(min_tokens=3, stop_token_ids=[2])
    got = _process(params, logits, prompt=[], output=[1, 1], eos=(0,))
    assert got[0] == float("-inf") and got[2] == float("-inf")
    assert got[1] == 1.0 and got[3] == 0.0 and got[4] == 3.0
    assert _process(params, logits, prompt=[], output=[1, 1, 1], eos=(0,)) == logits
    s = Sampler()
    greedy = SamplingParams(temperature=0, min_tokens=2)
    x = torch.tensor([logits] * 2)
    out = s(x, make_batch([greedy, greedy], outputs=[[3], [3, 3]], eos=[(0,), (0,)]))
    assert out.token_ids == [2, 0]
    sampled = [SamplingParams(min_tokens=5, stop_token_ids=[4])] * 2000
    toks = s(torch.tensor([logits] * 2000), make_batch(sampled, eos=[(0, 2)] * 2000)).token_ids
    assert set(toks) <= {1, 3}


# ---- seeds ----

def _seeded_run(seed: int, position: int, batch_size: int, sampler_seed: int, steps: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(steps, 500, generator=g)  # the seeded request's logits at each step
    fill = torch.Generator().manual_seed(sampler_seed)
    params = SamplingParams(seed=seed, temperature=1.0, top_p=0.95)
    others = [SamplingParams(temperature=0.8, seed=99), SamplingParams(top_k=5), SamplingParams(temperature=0)]
    sampler = Sampler(seed=sampler_seed)
    got = []
    for step in range(steps):
        x = torch.randn(batch_size, 500, generator=fill)
        x[position] = logits[step]
        ps = [others[i % 3] for i in range(batch_size)]
        ps[position] = params
        gens = [make_request_generator(99, step) if p.seed is not None else None for p in ps]
        gens[position] = make_request_generator(seed, step)
        got.append(sampler(x, make_batch(ps, gens=gens)).token_ids[position])
    return got


def test_seed_reproducible_across_batches_and_positions():
    a = _seeded_run(seed=7, position=0, batch_size=1, sampler_seed=0)
    b = _seeded_run(seed=7, position=5, batch_size=9, sampler_seed=3)
    c = _seeded_run(seed=7, position=2, batch_size=4, sampler_seed=11)
    assert a == b == c
    assert _seeded_run(seed=8, position=0, batch_size=1, sampler_seed=0) != a


def test_request_generator_is_per_seed_and_step():
    def draw(seed, step):
        return torch.rand(4, generator=make_request_generator(seed, step)).tolist()
    assert draw(1, 0) == draw(1, 0)
    assert draw(1, 0) != draw(1, 1)
    assert draw(1, 0) != draw(2, 0)
    assert draw(1, 1) != draw(2, 0)


def test_unseeded_rows_follow_sampler_seed():
    x = torch.randn(200, 300, generator=torch.Generator().manual_seed(5))
    params = make_batch([SamplingParams()] * 200)
    assert Sampler(seed=1)(x, params).token_ids == Sampler(seed=1)(x, params).token_ids
    assert Sampler(seed=1)(x, params).token_ids != Sampler(seed=2)(x, params).token_ids


# ---- logprobs ----

def _check_logprob(lp: Logprob, raw: torch.Tensor, token: int, n: int) -> None:
    ref = torch.log_softmax(raw.double(), -1)
    assert lp.token_id == token
    assert lp.logprob == pytest.approx(ref[token].item(), abs=1e-5)
    assert lp.rank == 1 + int((ref > ref[token]).sum())
    order = torch.argsort(ref, descending=True)[:n].tolist()
    assert [t for t, _ in lp.top] == order
    assert [v for _, v in lp.top] == pytest.approx(ref[order].tolist(), abs=1e-5)


def test_sampled_logprobs_are_raw_model_logprobs():
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5),
              SamplingParams(logprobs=0, temperature=0.0, logit_bias={7: 50.0}),
              SamplingParams(),  # no logprobs
              SamplingParams(logprobs=5, top_k=2),
              SamplingParams(logprobs=1, temperature=0.0),
              SamplingParams(logprobs=20, presence_penalty=2.0)]
    before = x.clone()
    out = Sampler()(x, make_batch(params, prompts=[[1, 2, 3]] * 6, outputs=[[4, 4]] * 6))
    assert torch.equal(x, before)  # the caller's logits are not modified
    assert out.logprobs[2] is None
    assert out.token_ids[1] == 7 and out.token_ids[4] == int(x[4].argmax())
    for i, p in enumerate(params):
        if p.logprobs is not None:
            _check_logprob(out.logprobs[i], x[i], out.token_ids[i], p.logprobs)
    assert out.logprobs[1].rank > 1 or int(x[1].argmax()) == 7


def test_compute_logprobs_for_prompt_tokens():
    x = torch.randn(2500, 40, generator=torch.Generator().manual_seed(4))  # spans several chunks
    ids = torch.randint(0, 40, (2500,), generator=torch.Generator().manual_seed(5))
    lps = Sampler().compute_logprobs(x, ids.tolist(), 3)
    assert len(lps) == 2500
    for i in (0, 1023, 1024, 2499):
        _check_logprob(lps[i], x[i], int(ids[i]), 3)
    per_row = Sampler().compute_logprobs(x[:3], ids[:3], [0, 2, 4])
    assert [len(lp.top) for lp in per_row] == [0, 2, 4]
    _check_logprob(per_row[2], x[2], int(ids[2]), 4)


def test_inverse_cdf_never_picks_masked_tokens_and_handles_u_near_one():
    from tokenmill.sample.logits_processors import inverse_cdf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    for u in (0.0, 0.25, 0.5, 0.5 - 1e-12, 1.0 - 2.0 ** -53):
        got = inverse_cdf(probs, torch.full((3,), u, dtype=torch.float64)).tolist()
        assert got[0] in (1, 3) and got[1] == 4 and got[2] == 0
    assert inverse_cdf(probs, torch.tensor([0.49, 0.0, 0.0], dtype=torch.float64)).tolist()[0] == 1
    assert inverse_cdf(probs, torch.tensor([0.51, 0.0, 0.0], dtype=torch.float64)).tolist()[0] == 3


def test_large_vocab_sampling_distribution(assert_fits):
    """A real vocabulary size (49152) with top-k: mass only on the kept tokens, in their proportions."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal(49152).astype(np.float32) * 2
    n = 6000
    rows = torch.tensor(logits).expand(n, -1).contiguous()
    out = Sampler(seed=1)(rows, make_batch([SamplingParams(temperature=0.8, top_k=8)] * n))
    keep = np.argsort(-logits)[:8]
    ids = np.array(out.token_ids)
    assert np.isin(ids, keep).all()
    p = softmax(logits[keep].astype(np.float64) / 0.8)
    assert_fits(np.array([(ids == k).sum() for k in keep]), p)


def test_top_p_from_candidates_equals_the_full_sort():
    """The top-p fast path (the top TOP_P_CANDIDATES logits, a full sort only for rows whose candidates hold
    less than top_p) keeps exactly the tokens the full sort keeps: peaked rows (the fast path), flat rows (the
    fallback), top-k with top-p, and rows of the batch without top-p."""
    from tokenmill.sample import logits_processors as lp

    g = torch.Generator().manual_seed(0)
    V = 4096
    scales = [0.05, 0.5, 2.0, 4.0, 8.0, 16.0] * 4  # flat to peaked
    logits = torch.randn(len(scales), V, generator=g) * torch.tensor(scales)[:, None]
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.95, 0.99, 1.0] * 4)[torch.randperm(len(scales), generator=g)]
    top_k = torch.tensor([V, 50, V, 7, V, 1000] * 4)
    for k in (None, top_k):
        max_k = int(top_k[top_k < V].max()) if k is not None else V
        got = lp.apply_top_k_top_p(logits, k, top_p, max_k)
        ref = lp.apply_top_k_top_p(logits, k, None, max_k) if k is not None else logits
        ref = lp._top_p_sorted(ref, top_p)
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
        assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(got)])  # kept logits unchanged
    # both paths ran: some rows are covered by their candidates, some are not
    probs = (logits.topk(lp.TOP_P_CANDIDATES, dim=-1).values - logits.logsumexp(-1, keepdim=True)).exp().sum(-1)
    assert bool((probs >= top_p).any()) and bool(((probs < top_p) & (top_p < 1)).any())


def test_row_argmax_matches_argmax_on_ties_and_nan():
    from tokenmill.sample.logits_processors import row_argmax

    x = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0))
    x[1, 10] = x[1, 20] = x[1].max() + 1.0  # tie: the first index wins
    x[2, :] = 0.0  # all equal
    x[3, 7] = float("nan")  # NaN wins, as in argmax
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert row_argmax(x)[1].item() == 10 and row_argmax(x)[2].item() == 0 and row_argmax(x)[3].item() == 7
