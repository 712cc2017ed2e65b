"""The compiled CPU paged-attention kernel (csrc/attention.c) on int8 / fp8 caches (kv_quant.QuantizedKVCache, read
with their scales in place) vs the pure-PyTorch path over the same cache (kv_quant.quantized_paged_attention:
dequantize, then reference.paged_attention). Random pools with shuffled block ids: decode batches of mixed lengths
(whole-row items), GQA / MQA / MHA, head dims read in registers (% 16) and through the float32 scratch (40), block
sizes, sliding windows, prefill chunks over cached prefixes mixed with decodes, batch-1 long contexts (split-K);
every e4m3 value; the backend's bf16 prefill split over an int8 cache; the fused layer's int8 write.
"""
from __future__ import annotations

import pytest
import torch

from tests.ops.paged_batch import random_paged_batch
from tokenmill.ops.attention import kv_quant as KQ
from tokenmill.ops.cpu.attention import cpu_attention_available, cpu_paged_attention, reads_kv_in_place
from tokenmill.ops.cpu.build import build_error

pytestmark = pytest.mark.skipif(not cpu_attention_available(),
                                reason=f"CPU attention kernel cannot be built: {build_error('attention')}")

DECODE_LENS = [1, 2, 15, 16, 17, 33, 64, 100, 255, 257, 300]


def _cache(kind: str, nb: int, bs: int, hkv: int, d: int, seed: int) -> KQ.QuantizedKVCache:
    """A pool of random K/V quantized by kv_quant's own functions (values over several orders of magnitude)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, nb, bs, hkv, d), generator=g) * torch.logspace(-2, 1, nb * bs).view(1, nb, bs, 1, 1)
    cache = KQ.allocate_quantized_kv_cache(1, nb, bs, hkv, d, kind, "cpu")[0]
    if kind == "int8":
        cache.data, cache.scale = KQ.quantize_int8(x)
    else:
        cache.scale = torch.rand((2, hkv), generator=g) * 0.02 + 0.005  # the largest values saturate at 448
        for i in range(2):
            cache.data[i] = KQ.quantize_fp8(x[i], cache.scale[i])
    return cache


def _run(reqs, h, hkv, d, bs, kind="int8", window=None, seed=0):
    torch.manual_seed(seed)
    nb = sum(-(-(c + n) // bs) for c, n in reqs) + 7  # a few blocks nobody owns
    batch = random_paged_batch(reqs, bs, nb, seed)
    cache = _cache(kind, nb, bs, hkv, d, seed)
    q = torch.randn((batch.num_tokens, h, d))
    scale = d ** -0.5
    want = KQ.quantized_paged_attention(q, cache, batch, scale, window)
    got = cpu_paged_attention(q, cache, batch, scale, window)
    assert got.shape == want.shape and got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # K/V up to ~30: float32 rounding of the sums


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("h,hkv", [(9, 3), (8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("d", [64, 128, 40])
@pytest.mark.parametrize("bs", [16, 32])
def test_decode_batches_of_mixed_lengths(kind, h, hkv, d, bs):
    _run([(n - 1, 1) for n in DECODE_LENS], h, hkv, d, bs, kind, seed=h + d + bs)


def test_in_place_probe():
    """int8 / fp8 are read in place where bf16 is (AVX-512, head_dim % 16 == 0)."""
    for dt in (torch.int8, KQ.FP8_DTYPE):
        assert reads_kv_in_place(dt, 64) == reads_kv_in_place(torch.bfloat16, 64)
        assert not reads_kv_in_place(dt, 40)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("window", [1, 7, 40])
def test_sliding_window(kind, window):
    _run([(n - 1, 1) for n in DECODE_LENS] + [(50, 37), (0, 45)], 8, 2, 64, 16, kind, window=window)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("d", [64, 40])
def test_prefill_chunks_over_cached_prefixes_mixed_with_decodes(kind, d):
    reqs = [(0, 70), (129, 1), (200, 45), (16, 16), (5, 1), (0, 1), (31, 80)]
    _run(reqs, 9, 3, d, 16, kind)
    _run(reqs, 8, 2, d, 32, kind, seed=1)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("n", [1, 700, 2049])
def test_batch_one_long_context_split_k(kind, n):
    _run([(n - 1, 1)], 9, 3, 64, 16, kind)
    _run([(n, 3)], 8, 2, 128, 16, kind, seed=2)


@pytest.mark.parametrize("d", [16, 40])
def test_every_e4m3_value(d):
    """One key per request (softmax weight exactly 1): the output is the dequantized V row, every e4m3 bit pattern
    but the two NaNs, converted exactly (subnormals, +-448, -0) in registers (d 16) and in scratch (d 40)."""
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    n = -(-codes.numel() // d)
    batch = random_paged_batch([(0, 1)] * n, 16, n + 3, seed=0)
    cache = KQ.allocate_quantized_kv_cache(1, n + 3, 16, 1, d, "fp8", "cpu")[0]
    cache.scale[1, 0] = 0.5
    vals = torch.zeros(n * d, dtype=torch.uint8)
    vals[:codes.numel()] = codes
    slots = batch.slot_mapping.long()
    cache.data.view(torch.uint8)[1].view(-1, d)[slots] = vals.view(n, d)
    got = cpu_paged_attention(torch.randn(n, 1, d), cache, batch, 1.0)
    want = vals.view(KQ.FP8_DTYPE).float().view(n, 1, d) * 0.5
    assert torch.equal(got, want)


def test_backend_int8_prefill_split_and_decode():
    """CpuAttentionBackend over an int8 cache: decodes and short chunks read it in place (= the kernel alone); with
    prefill_dtype bf16, chunks of >= 64 queries attend in bf16 over a bf16 copy of their dequantized blocks: what the
    same backend gives over the dequantized float32 cache (the AMX kernel / SDPA round K/V to bf16 the same way)."""
    from tokenmill.ops.attention.backend import PREFILL_MIN_TOKENS, CpuAttentionBackend

    reqs = [(0, 70), (129, 1), (200, 64), (16, 16), (5, 1), (31, 130), (0, 63)]
    h, hkv, d, bs = 9, 3, 64, 16
    torch.manual_seed(0)
    nb = sum(-(-(c + n) // bs) for c, n in reqs) + 3
    batch = random_paged_batch(reqs, bs, nb, seed=4)
    q, k, v = (torch.randn(batch.num_tokens, n, d) for n in (h, hkv, hkv))
    base = _cache("int8", nb, bs, hkv, d, seed=3)
    cache = KQ.QuantizedKVCache(base.data.clone(), base.scale.clone(), "int8")
    KQ.write_kv_quantized(base, k, v, batch.slot_mapping)
    want = KQ.quantized_paged_attention(q, base, batch, d ** -0.5)
    kernel = CpuAttentionBackend().forward(q, k, v, cache, batch, d ** -0.5, None)
    assert torch.equal(cache.data, base.data) and torch.equal(cache.scale, base.scale)
    assert torch.equal(kernel, cpu_paged_attention(q, base, batch, d ** -0.5))
    torch.testing.assert_close(kernel, want, rtol=1e-4, atol=1e-4)
    bf16 = CpuAttentionBackend(prefill_dtype=torch.bfloat16)
    split = bf16.attend(q, base, batch, d ** -0.5, None)
    dense = KQ.dequantize(base.data, base.scale, "int8", torch.float32)
    long = torch.cat([torch.full((n,), n >= PREFILL_MIN_TOKENS) for _, n in reqs])
    assert torch.equal(split[~long], kernel[~long])
    assert not torch.equal(split[long], kernel[long])  # really the bf16 path
    torch.testing.assert_close(split[long], bf16.attend(q, dense, batch, d ** -0.5, None)[long], rtol=1e-5, atol=1e-5)


def test_bad_inputs_get_clear_errors():
    batch = random_paged_batch([(3, 1)], 16, 4, seed=0)
    cache = KQ.allocate_quantized_kv_cache(1, 4, 16, 2, 64, "int8", "cpu")[0]
    q = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="needs its scales"):
        cpu_paged_attention(q, cache.data, batch)
    with pytest.raises(ValueError, match="scales must be"):
        cpu_paged_attention(q, KQ.QuantizedKVCache(cache.data, cache.scale[:, :, :, :1].contiguous(), "int8"), batch)
