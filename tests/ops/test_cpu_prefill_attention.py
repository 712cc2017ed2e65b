"""Prefill attention kernel (tokenmill/ops/cpu/csrc/attention_prefill.c: AMX tiles, or AVX512-BF16's vdpbf16ps in
attention_prefill_bf16.c where the CPU has no AMX; whichever this machine runs) vs reference.paged_attention.

Random pools with shuffled block ids: prefill chunks over cached prefixes (prefix-cache hits), several requests of
different lengths in one call, mixed with decodes, GQA ratios, head dims, block sizes (direct tile loads from a bf16
pool where blocks hold whole 16-key tiles, staged rows otherwise), float32 / bfloat16 pools, sliding windows, sharp
score distributions (the lazily moved running max), and CpuAttentionBackend(prefill_dtype=bf16) routing long chunks
to it. The oracle is the float32 reference on bf16-rounded q, K, V; the kernel also rounds the probabilities to
bf16 (relative error 2^-9 each), hence the tolerance (a wrong mask, window or rescale is off by ~0.1-1).
Skipped where no prefill kernel runs (a CPU without AVX512-BF16; test_cpu_attention.py checks that every CPU with it
runs one).
"""
from __future__ import annotations

import pytest
import torch

from tests.ops.paged_batch import random_paged_batch
from tokenmill.ops.attention import reference as R
from tokenmill.ops.cpu.attention import cpu_attention_available, cpu_prefill_attention, prefill_kernel_supports

pytestmark = pytest.mark.skipif(not (cpu_attention_available() and prefill_kernel_supports(torch.bfloat16, 64)),
                                reason="no prefill attention kernel (AMX or AVX512-BF16) runs on this machine")


def _case(reqs, h, hkv, d, bs, kv_dtype=torch.bfloat16, q_gain=1.0, seed=0):
    torch.manual_seed(seed)
    nb = sum(-(-(c + n) // bs) for c, n in reqs) + 5  # a few blocks nobody owns
    batch = random_paged_batch(reqs, bs, nb, seed)
    kv = torch.randn((2, nb, bs, hkv, d)).to(kv_dtype)
    q = torch.randn((batch.num_tokens, h, d)) * q_gain
    return q, kv, batch


def _check(reqs, h, hkv, d, bs, window=None, kv_dtype=torch.bfloat16, q_gain=1.0, seed=0):
    q, kv, batch = _case(reqs, h, hkv, d, bs, kv_dtype, q_gain, seed)
    scale = d ** -0.5
    want = R.paged_attention(q.bfloat16().float(), kv.bfloat16().float(), batch, scale, window)
    got = cpu_prefill_attention(q, kv, batch, scale, window)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.015)
    assert (got - want).abs().mean() < 1e-3  # no small systematic error hiding under the tolerance
    return got


MIXED = [(0, 70), (129, 1), (200, 45), (16, 16), (5, 1), (0, 1), (31, 80), (0, 200)]


@pytest.mark.parametrize("h,hkv", [(9, 3), (8, 2), (4, 4), (8, 1)])
def test_prefill_chunks_over_cached_prefixes_mixed_with_decodes(h, hkv):
    _check(MIXED, h, hkv, 64, 16, seed=h + hkv)


@pytest.mark.parametrize("d", [32, 96, 128])
@pytest.mark.parametrize("bs", [8, 16, 32, 64])
def test_head_dims_and_block_sizes(d, bs):
    _check([(0, 64), (47, 33), (300, 100), (3, 1)], 6, 2, d, bs, seed=d + bs)


@pytest.mark.parametrize("bs", [8, 16])
def test_float32_pool(bs):
    _check(MIXED, 9, 3, 64, bs, kv_dtype=torch.float32)


@pytest.mark.parametrize("window", [1, 7, 16, 33, 40, 4096])
def test_sliding_window(window):
    _check(MIXED + [(500, 64)], 8, 2, 64, 16, window=window, seed=window)


@pytest.mark.parametrize("q_gain", [4.0, 12.0])
def test_sharp_scores_move_the_running_max(q_gain):
    """Scores spread over tens of log2 units: the running max moves (rescaling l and O) in many chunks."""
    _check([(0, 130), (90, 70), (1000, 64)], 9, 3, 64, 16, q_gain=q_gain, seed=int(q_gain))


def test_rising_scores_along_the_keys():
    """Each chunk's max above the last: the rescale runs in every chunk (keys' component along q grows)."""
    q, kv, batch = _case([(0, 256), (64, 96)], 4, 2, 64, 16)
    q[..., 0] = 4.0
    pos = torch.arange(kv.shape[1] * kv.shape[2], dtype=torch.float32).view(kv.shape[1], kv.shape[2], 1)
    kv[0, ..., 0] = (pos / 8).to(kv.dtype)  # block ids are shuffled: any order of blocks, still a wide spread
    want = R.paged_attention(q.bfloat16().float(), kv.float(), batch, 0.125, None)
    got = cpu_prefill_attention(q, kv, batch, 0.125, None)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


def test_long_prompt_and_long_prefix():
    _check([(0, 1100)], 9, 3, 64, 16, seed=1)
    _check([(2048, 200)], 9, 3, 64, 16, seed=2)


def test_bad_input_raises_clear_errors():
    q, kv, batch = _case([(0, 40)], 4, 2, 64, 16)
    batch.block_tables[0, 0] = kv.shape[1] + 3
    with pytest.raises(ValueError, match="block id out of range"):
        cpu_prefill_attention(q, kv, batch)
    q, kv, batch = _case([(0, 40)], 4, 2, 48, 16)
    with pytest.raises(ValueError, match="unavailable"):
        cpu_prefill_attention(q, kv, batch)
    assert not prefill_kernel_supports(torch.float16, 64) and not prefill_kernel_supports(torch.bfloat16, 48)


@pytest.mark.parametrize("window", [None, 50])
def test_backend_routes_long_chunks_to_the_kernel(window):
    """CpuAttentionBackend(prefill_dtype=bf16): chunks of >= PREFILL_MIN_TOKENS queries are the prefill kernel's
    result bit for bit, the rest of the step the float32 kernel's."""
    from tokenmill.ops.attention.backend import PREFILL_MIN_TOKENS, CpuAttentionBackend
    from tokenmill.ops.cpu.attention import cpu_paged_attention

    reqs = [(0, 70), (129, 1), (200, 64), (16, 16), (5, 1), (31, 130), (0, 63)]
    q, kv, batch = _case(reqs, 9, 3, 64, 16)
    got = CpuAttentionBackend(prefill_dtype=torch.bfloat16).attend(q, kv, batch, 0.125, window)
    long = torch.cat([torch.full((n,), n >= PREFILL_MIN_TOKENS) for _, n in reqs])
    prefill = cpu_prefill_attention(q, kv, batch, 0.125, window)  # every request through the prefill kernel
    assert torch.equal(got[long], prefill[long])
    assert torch.equal(got[~long], cpu_paged_attention(q, kv, batch, 0.125, window)[~long])


def test_backend_keeps_bf16_sdpa_where_the_kernel_cannot_run():
    """head_dim 48 (not a multiple of 32): long chunks take bf16 SDPA as before the kernel, still near the reference."""
    from tokenmill.ops.attention.backend import PREFILL_MIN_TOKENS, CpuAttentionBackend
    from tokenmill.ops.cpu.attention import cpu_paged_attention

    reqs = [(0, 70), (129, 1), (31, 130)]
    q, kv, batch = _case(reqs, 4, 2, 48, 16)
    got = CpuAttentionBackend(prefill_dtype=torch.bfloat16).attend(q, kv, batch, 48 ** -0.5, None)
    long = torch.cat([torch.full((n,), n >= PREFILL_MIN_TOKENS) for _, n in reqs])
    kernel = cpu_paged_attention(q, kv, batch, 48 ** -0.5, None)
    assert torch.equal(got[~long], kernel[~long]) and not torch.equal(got[long], kernel[long])
    torch.testing.assert_close(got, R.paged_attention(q, kv.float(), batch, 48 ** -0.5, None), rtol=0.05, atol=0.03)
