"""The fused CPU sampler (csrc/sampler.c) against the PyTorch path it replaces (apply_sampling_filters, softmax,
inverse_cdf): the same token for the same uniform, over many uniforms a row (so the kept set and its masses agree,
not just one draw), for every filter alone and combined, flat and peaked rows, ties, banned (-inf) and NaN logits."""
from __future__ import annotations

import pytest
import torch

from tokenmill.ops.cpu import sampler as cpu_sampler
from tokenmill.sample.logits_processors import apply_sampling_filters, inverse_cdf
from tokenmill.sample.sampler import Sampler, SamplingBatch
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not cpu_sampler.available(), reason="no C compiler for the CPU kernels")

U = (torch.arange(97, dtype=torch.float64) + 0.37) / 97  # uniforms tried on every row (no exact tie fractions)


def reference(x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    return inverse_cdf(apply_sampling_filters(x.clone(), params).softmax(dim=-1), u)


def both(x: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, len(U)] from the kernel and from the reference, every row tried with every uniform in U."""
    B = x.shape[0]
    xs = x.repeat_interleave(len(U), dim=0)
    ps = [p for p in params for _ in range(len(U))]
    us = U.repeat(B)
    return (cpu_sampler.sample_rows(xs, ps, us).view(B, -1), reference(xs, ps, us).view(B, -1))


FILTERS = [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.3, min_p=0.05),
           dict(temperature=0.8, top_k=1), dict(temperature=0.8, top_k=7), dict(temperature=1.0, top_k=300),
           dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_p=0.95), dict(temperature=1.0, top_p=0.3),
           dict(temperature=0.9, top_k=50, top_p=0.8), dict(temperature=1.0, min_p=0.02, top_k=40, top_p=0.9),
           dict(temperature=0.6, min_p=0.1, top_p=0.99)]


@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0], ids=["flat", "mid", "peaked"])
def test_same_tokens_as_reference(kw, scale):
    g = torch.Generator().manual_seed(int(scale * 10) + len(kw))
    V = 5003  # not a multiple of 16: the scalar tail too
    x = torch.randn(6, V, generator=g) * scale
    got, want = both(x, [SamplingParams(max_tokens=1, **kw)] * 6)
    assert torch.equal(got, want)


def test_mixed_rows_and_greedy_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(FILTERS) + 2, 4096, generator=g) * 4
    params = [SamplingParams(max_tokens=1, **kw) for kw in FILTERS]
    params += [SamplingParams(max_tokens=1, temperature=0.0), SamplingParams(max_tokens=1, temperature=0.5)]
    u = torch.rand(len(params), generator=g, dtype=torch.float64)
    got = cpu_sampler.sample_rows(x, params, u)
    want = reference(x, params, u)
    assert got[-2].item() == -1  # greedy rows are the caller's (argmax)
    keep = [i for i in range(len(params)) if i != len(params) - 2]
    assert torch.equal(got[keep], want[keep])


def test_ties_banned_and_nan_logits():
    x = torch.zeros(4, 600)
    x[0, 100:110] = 5.0  # ten tied maxima
    x[1, :] = float("-inf")
    x[1, [7, 300, 599]] = torch.tensor([1.0, 2.0, 0.5])  # all but three banned
    x[2, ::2] = float("nan")
    x[2, 11] = 3.0
    x[3, 50] = float("-inf")  # one banned token among equals
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=3)] * 2 + [
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)] * 2
    xs = x.repeat_interleave(len(U), dim=0)
    ps = [p for p in params for _ in range(len(U))]
    got = cpu_sampler.sample_rows(xs, ps, U.repeat(4)).view(4, -1)
    assert set(got[0].tolist()) == set(range(100, 110))  # ties at the k-th value are kept
    assert set(got[1].tolist()) == {7, 300, 599}
    assert not torch.isnan(x[2, got[2]]).any()  # a NaN logit is never drawn
    # 599 equal tokens and top_p 0.5: all are kept (ties at the threshold are, as the reference's candidate
    # stage keeps them; its full-sort fallback would break the tie by sort order), the banned one never
    assert 50 not in got[3].tolist() and got[3].tolist() == sorted(got[3].tolist()) and got[3, -1] > 590
    want = reference(x[[0, 1]].repeat_interleave(len(U), dim=0), [params[i] for i in (0, 1) for _ in U],
                     U.repeat(2)).view(2, -1)
    assert torch.equal(got[[0, 1]], want)


def test_sampler_uses_the_kernel_and_matches_the_reference_path():
    """Sampler (fused on the CPU) and Sampler(fused_cpu=False) draw the same tokens from the same seed."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 49152, generator=g) * 4
    params = [SamplingParams(max_tokens=4, **FILTERS[i % len(FILTERS)]) for i in range(64)]
    batch = SamplingBatch(params, [[1]] * 64, [[2]] * 64, [()] * 64, [None] * 64)
    assert Sampler(seed=5).fused_cpu and not Sampler(seed=5, fused_cpu=False).fused_cpu
    assert Sampler(seed=5)(x, batch).token_ids == Sampler(seed=5, fused_cpu=False)(x, batch).token_ids
