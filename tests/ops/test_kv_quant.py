"""Quantized KV cache (int8 per-token, fp8 e4m3 per-head): round-trip bounds, paged write layout, and
paged attention over a quantized cache vs the unquantized reference on random inputs; the Triton
kernels on quantized caches (Triton's interpreter without CUDA: TRITON_INTERPRET=1, Triton's own switch,
set before anything imports triton, as in test_triton_attention.py)."""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tokenmill.ops.attention import kv_quant as KQ
from tokenmill.ops.attention import reference as R
from tokenmill.ops.attention.backend import ReferenceAttentionBackend
from tokenmill.worker.forward_batch import ForwardBatch, build_forward_batch

# relative (to the row's absmax) round-trip bounds: int8 half a step of absmax/127; e4m3 3 mantissa bits
INT8_REL = 0.5 / 127 + 1e-6
FP8_REL = 2.0 ** -4  # half ulp of a 3-bit mantissa, relative to the value itself


def test_int8_round_trip_bound():
    torch.manual_seed(0)
    x = torch.randn(64, 4, 32) * torch.logspace(-3, 2, 64)[:, None, None]  # rows of very different scales
    q, s = KQ.quantize_int8(x)
    assert q.dtype == torch.int8 and s.shape == (64, 4) and s.dtype == torch.float32
    y = KQ.dequantize(q, s, "int8", torch.float32)
    err = (y - x).abs().amax(-1)
    assert (err <= INT8_REL * x.abs().amax(-1)).all()
    assert int(q.abs().max()) == 127  # the absmax maps to the full range
    zero_q, zero_s = KQ.quantize_int8(torch.zeros(2, 3, 8))
    assert torch.equal(KQ.dequantize(zero_q, zero_s, "int8", torch.float32), torch.zeros(2, 3, 8))


def test_fp8_round_trip_bound_and_saturation():
    torch.manual_seed(1)
    scale = torch.tensor([1.0, 0.25, 4.0])
    x = torch.randn(50, 3, 16) * 5
    y = KQ.dequantize(KQ.quantize_fp8(x, scale), scale, "fp8", torch.float32)
    normal = (x / scale[:, None]).abs() >= 2.0 ** -6  # e4m3 normal range: relative bound holds there
    rel = ((y - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert float(rel.max()) <= FP8_REL
    big = torch.full((1, 3, 4), 1e4)
    yb = KQ.dequantize(KQ.quantize_fp8(big, scale), scale, "fp8", torch.float32)
    assert torch.isfinite(yb).all() and torch.allclose(yb[0, :, 0], KQ.FP8_MAX * scale)


def test_bytes_per_token_counts_scales():
    assert KQ.kv_bytes_per_token_per_layer("float32", 3, 64) == 2 * 3 * 64 * 4
    assert KQ.kv_bytes_per_token_per_layer("bfloat16", 3, 64) == 2 * 3 * 64 * 2
    assert KQ.kv_bytes_per_token_per_layer("float16", 3, 64) == 2 * 3 * 64 * 2
    assert KQ.kv_bytes_per_token_per_layer("int8", 3, 64) == 2 * 3 * (64 + 4)
    assert KQ.kv_bytes_per_token_per_layer("fp8", 3, 64) == 2 * 3 * 64
    c = KQ.allocate_quantized_kv_cache(1, 5, 16, 3, 64, "int8", "cpu")[0]
    assert c.nbytes() == 5 * 16 * KQ.kv_bytes_per_token_per_layer("int8", 3, 64)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_write_lands_in_slots_and_skips_padding(kind):
    torch.manual_seed(2)
    nb, bs, hkv, d = 6, 4, 2, 8
    cache = KQ.allocate_quantized_kv_cache(1, nb, bs, hkv, d, kind, "cpu")[0]
    k, v = torch.randn(5, hkv, d), torch.randn(5, hkv, d)
    slots = torch.tensor([3, 9, -1, 17, 4])
    KQ.write_kv_quantized(cache, k, v, slots)
    deq = KQ.dequantize_blocks(cache, torch.arange(nb), torch.float32).view(2, nb * bs, hkv, d)
    tol = 0.1 if kind == "fp8" else 0.02
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.allclose(deq[0, s], k[t], atol=tol, rtol=0.07)
            assert torch.allclose(deq[1, s], v[t], atol=tol, rtol=0.07)
    untouched = [s for s in range(nb * bs) if s not in slots.tolist()]
    assert deq[:, untouched].abs().max() == 0


def _batch(reqs: list[tuple[int, int]], block_size: int, num_blocks: int, seed: int) -> ForwardBatch:
    """reqs: (tokens already cached, tokens computed now); blocks drawn at random (block 0 = null, unused)."""
    rng = random.Random(seed)
    pool = list(range(1, num_blocks))
    rng.shuffle(pool)
    tables, toks, done = [], [], []
    for cached, new in reqs:
        nblk = -(-(cached + new) // block_size)
        tables.append([pool.pop() for _ in range(nblk)])
        toks.append([0] * new)
        done.append(cached)
    return build_forward_batch(toks, done, tables, block_size, device="cpu")


CASES = [
    # (reqs, block_size, H, Hkv, D, sliding_window)
    ([(0, 13), (20, 1), (7, 5), (31, 1)], 8, 4, 2, 16, None),  # mixed prefill chunks + decodes
    ([(40, 1), (3, 1), (17, 1)], 16, 6, 3, 32, None),  # decode only, ragged lengths
    ([(0, 33)], 4, 2, 1, 64, 9),  # one long prefill, MQA, sliding window
    ([(12, 20), (0, 1)], 16, 8, 8, 8, None),  # MHA, tiny head_dim
]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_quantized_vs_unquantized(kind, case):
    reqs, bs, h, hkv, d, window = CASES[case]
    torch.manual_seed(case)
    nb = sum(-(-(c + n) // bs) for c, n in reqs) + 3
    batch = _batch(reqs, bs, nb, seed=case)
    # fill the cached prefix of every request and this step's tokens through the normal write path
    hist = _batch([(0, c + n) for c, n in reqs], bs, nb, seed=case)
    total = hist.num_tokens
    k_all, v_all = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
    dense = R.allocate_kv_cache(1, nb, bs, hkv, d, torch.float32, "cpu")[0]
    quant = KQ.allocate_quantized_kv_cache(1, nb, bs, hkv, d, kind, "cpu")[0]
    R.write_kv(dense, k_all, v_all, hist.slot_mapping)
    KQ.write_kv_quantized(quant, k_all, v_all, hist.slot_mapping)
    q = torch.randn(batch.num_tokens, h, d)
    ref = R.paged_attention(q, dense, batch, None, window)
    out = KQ.quantized_paged_attention(q, quant, batch, None, window)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # outputs are convex mixes of V rows (|v| ~ 1): bounds from the per-element K/V error
    bound = 0.03 if kind == "int8" else 0.15
    err = (out - ref).abs().max().item()
    assert err < bound, err
    # and quantization must actually be in effect (not a silent fallback to exact values)
    assert err > 0
    # the dense oracle on the dequantized cache agrees to float precision
    deq = KQ.dequantize_blocks(quant, torch.arange(nb), torch.float32)
    assert torch.allclose(out, R.paged_attention(q, deq, batch, None, window), atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_reference_backend_dispatches_on_quantized_cache(kind):
    torch.manual_seed(5)
    bs, h, hkv, d = 8, 4, 2, 16
    batch = _batch([(0, 10), (0, 3)], bs, 6, seed=5)
    q, k, v = torch.randn(13, h, d), torch.randn(13, hkv, d), torch.randn(13, hkv, d)
    quant = KQ.allocate_quantized_kv_cache(1, 6, bs, hkv, d, kind, "cpu")[0]
    dense = R.allocate_kv_cache(1, 6, bs, hkv, d, torch.float32, "cpu")[0]
    out = ReferenceAttentionBackend().forward(q, k, v, quant, batch, d ** -0.5, None)
    ref = ReferenceAttentionBackend().forward(q, k, v, dense, batch, d ** -0.5, None)
    assert quant.data.abs().float().sum() > 0  # written through the quantized path
    assert (out - ref).abs().max() < (0.03 if kind == "int8" else 0.15)


def test_unknown_kind_is_a_config_error():
    from tokenmill.errors import ConfigError

    with pytest.raises(ConfigError):
        KQ.storage_dtype("int4")


# ---- Triton kernels (compiled on CUDA, Triton's interpreter on CPU) ---------------------------------
@pytest.fixture(scope="module")
def triton_backend_module():
    pytest.importorskip("triton")
    from tests.ops.test_triton_attention import TA  # sets TRITON_INTERPRET=1 without CUDA, reloads kernels

    return TA


def _filled(kind: str, case: int, writer) -> tuple[KQ.QuantizedKVCache, ForwardBatch, torch.Tensor, torch.Tensor]:
    reqs, bs, h, hkv, d, window = CASES[case]
    torch.manual_seed(case)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    nb = sum(-(-(c + n) // bs) for c, n in reqs) + 3
    hist = _batch([(0, c + n) for c, n in reqs], bs, nb, seed=case)
    k_all, v_all = torch.randn(hist.num_tokens, hkv, d), torch.randn(hist.num_tokens, hkv, d)
    cache = KQ.allocate_quantized_kv_cache(1, nb, bs, hkv, d, kind, dev)[0]
    writer(cache, k_all.to(dev), v_all.to(dev), hist.slot_mapping.to(dev))
    return cache, _batch(reqs, bs, nb, seed=case), k_all, v_all


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("case", [0, 2])
def test_triton_reads_quantized_cache_like_reference(kind, case, triton_backend_module):
    """Same quantized cache: the Triton prefill/decode kernels (scales applied in the loop) match the
    reference dequantize-then-attend path to float precision."""
    TA = triton_backend_module
    cache, batch, _, _ = _filled(kind, case, KQ.write_kv_quantized)
    window = CASES[case][5]
    dev = cache.device
    batch_dev = _batch_to(batch, dev)
    q = torch.randn(batch.num_tokens, CASES[case][2], CASES[case][4], device=dev)
    ref = KQ.quantized_paged_attention(q.cpu(), _to_cpu(cache), batch, None, window)
    be = TA.TritonAttentionBackend(block_m=16, block_n=16, decode_block_n=16, decode_num_splits=2)
    out = be.attention(q, cache, batch_dev, None, window)
    assert torch.allclose(out.cpu(), ref, atol=2e-5), (out.cpu() - ref).abs().max()
    rows = [i for i, n in enumerate(batch.query_lens_cpu) if n == 1]  # the decode kernel on the decode rows
    if rows:
        tok = [batch.query_start_loc.tolist()[i] for i in rows]
        od = TA.triton_decode_attention(q[tok], cache, batch_dev.block_tables[rows], batch_dev.seq_lens[rows],
                                        CASES[case][4] ** -0.5, window, num_splits=2, block_n=16)
        assert torch.allclose(od.cpu(), ref[tok], atol=2e-5)


@pytest.mark.kernel
@pytest.mark.parametrize("case", [0, 1])
def test_triton_int8_write_matches_reference(case, triton_backend_module):
    TA = triton_backend_module
    ref, _, k_all, v_all = _filled("int8", case, KQ.write_kv_quantized)
    out, _, _, _ = _filled("int8", case, TA.triton_write_kv)
    assert torch.equal(out.data.cpu(), ref.data.cpu())
    assert torch.allclose(out.scale.cpu(), ref.scale.cpu(), rtol=1e-6, atol=0)


@pytest.mark.kernel
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter rounds float32 -> fp8 wrongly "
                    "near powers of two (e.g. -0.488 -> -0.25); the fp8 write kernel is checked on CUDA only")
def test_triton_fp8_write_matches_reference(triton_backend_module):
    TA = triton_backend_module
    ref, _, _, _ = _filled("fp8", 0, KQ.write_kv_quantized)
    out, _, _, _ = _filled("fp8", 0, TA.triton_write_kv)
    assert torch.equal(out.data.view(torch.uint8).cpu(), ref.data.view(torch.uint8).cpu())


def _to_cpu(c: KQ.QuantizedKVCache) -> KQ.QuantizedKVCache:
    return KQ.QuantizedKVCache(c.data.cpu(), c.scale.cpu(), c.kind)


def _batch_to(batch: ForwardBatch, dev) -> ForwardBatch:
    import dataclasses

    moved = {f.name: getattr(batch, f.name).to(dev) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **moved)
