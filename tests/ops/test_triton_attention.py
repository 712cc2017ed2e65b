"""Triton paged-attention kernels vs reference.paged_attention on random inputs.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, Triton's own switch): the
variable is set here before the kernels are decorated, and the kernel modules are reloaded if something
imported them earlier in compiled mode. On a CUDA machine the same tests run the compiled kernels.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tokenmill.ops.attention import reference as R  # noqa: E402
from tokenmill.worker.forward_batch import ForwardBatch, build_forward_batch  # noqa: E402
from tests.ops.paged_batch import random_paged_batch  # noqa: E402


def _load_triton_modules():
    names = ["tokenmill.ops.attention.triton_kernels", "tokenmill.ops.attention.triton_attention"]
    kern = importlib.import_module(names[0])
    if os.environ.get("TRITON_INTERPRET") == "1" and type(kern._write_kv_kernel).__name__ != "InterpretedFunction":
        kern = importlib.reload(kern)
        if names[1] in sys.modules:
            importlib.reload(sys.modules[names[1]])
    return importlib.import_module(names[1])


TA = _load_triton_modules()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.kernel


def _make_batch(reqs: list[tuple[int, int]], block_size: int, num_blocks: int, seed: int) -> ForwardBatch:
    return random_paged_batch(reqs, block_size, num_blocks, seed, device=DEVICE)


def _rand_cache(num_blocks, block_size, hkv, d, dtype=torch.float32) -> torch.Tensor:
    return torch.randn((2, num_blocks, block_size, hkv, d), dtype=dtype, device=DEVICE)


def _check(out: torch.Tensor, ref: torch.Tensor, atol: float = 2e-4) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)


def test_write_kv_matches_reference_and_skips_padding():
    t, hkv, d, bs, nb = 7, 3, 80, 16, 4
    kv_ref = _rand_cache(nb, bs, hkv, d)
    kv_tri = kv_ref.clone()
    qkv = torch.randn(t, (4 + 2 * hkv) * d, device=DEVICE)  # k, v as strided views of a packed projection
    k = qkv[:, 4 * d:(4 + hkv) * d].view(t, hkv, d)
    v = qkv[:, (4 + hkv) * d:].view(t, hkv, d)
    slots = torch.tensor([5, -1, 17, 63, -1, 0, 40], device=DEVICE)
    R.write_kv(kv_ref, k, v, slots)
    TA.triton_write_kv(kv_tri, k, v, slots)
    assert torch.equal(kv_ref, kv_tri)
    untouched = _rand_cache(nb, bs, hkv, d)
    before = untouched.clone()
    TA.triton_write_kv(untouched, k, v, torch.full((t,), -1, device=DEVICE))
    assert torch.equal(untouched, before)


# (heads, kv heads, head_dim, block_size, sliding window): GQA 1/4/8, D 64/128, blocks 16/32
PREFILL_CASES = [
    (4, 4, 64, 16, None),
    (8, 2, 128, 32, None),
    (8, 1, 64, 32, None),
    (8, 2, 64, 16, 13),
]


@pytest.mark.parametrize("h,hkv,d,bs,window", PREFILL_CASES)
def test_prefill_ragged_with_cached_prefix(h, hkv, d, bs, window):
    # fresh prompt longer than BLOCK_M, chunk after an unaligned cached prefix, a decode row,
    # a chunk starting exactly on a block boundary
    reqs = [(0, 37), (21, 11), (50, 1), (2 * bs, 5)]
    nb = 24
    batch = _make_batch(reqs, bs, nb, seed=h * d + bs)
    kv_ref = _rand_cache(nb, bs, hkv, d)  # random old contents stand in for the cached prefix
    kv_tri = kv_ref.clone()
    t = batch.num_tokens
    qkv = torch.randn(t, (h + 2 * hkv) * d, device=DEVICE)  # strided views, as a fused projection gives
    q = qkv[:, :h * d].view(t, h, d)
    k = qkv[:, h * d:(h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    scale = 0.7 / d ** 0.5
    R.write_kv(kv_ref, k, v, batch.slot_mapping)
    ref = R.paged_attention(q, kv_ref, batch, scale, window)
    out = TA.TritonAttentionBackend(block_m=16, block_n=16).forward(q, k, v, kv_tri, batch, scale, window)
    assert torch.equal(kv_ref, kv_tri)
    _check(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_prefill_and_decode_vs_dense_oracle(dtype):
    if dtype is torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton 3.9's interpreter computes tl.dot on bfloat16 wrongly; bf16 runs on CUDA only")
    h, hkv, d, bs = 8, 2, 64, 16
    n = 40
    batch = _make_batch([(0, n)], bs, 8, seed=3)
    kv = _rand_cache(8, bs, hkv, d, dtype)
    q = torch.randn(n + 1, h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(n + 1, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(n + 1, hkv, d, device=DEVICE, dtype=dtype)
    backend = TA.TritonAttentionBackend(block_m=16, block_n=32, decode_block_n=16, decode_num_splits=2)
    out = backend.forward(q[:n], k[:n], v[:n], kv, batch)
    ref = R.dense_causal_attention(q.float(), k.float(), v.float())
    _check(out.float(), ref[:n], atol=2e-2)
    step = build_forward_batch([[1]], [n], batch.block_tables.tolist(), bs, device=DEVICE)
    out = backend.forward(q[n:], k[n:], v[n:], kv, step)  # decode the next token on the cache
    _check(out.float(), ref[n:], atol=2e-2)


# (heads, kv heads, head_dim, block_size, window, splits)
DECODE_CASES = [
    (8, 1, 128, 16, None, 1),
    (8, 1, 128, 16, None, 4),
    (4, 4, 64, 32, None, 3),
    (8, 2, 64, 16, None, 8),
    (8, 2, 64, 32, 50, 4),
]


@pytest.mark.parametrize("h,hkv,d,bs,window,splits", DECODE_CASES)
def test_decode_split_k_long_context(h, hkv, d, bs, window, splits):
    reqs = [(300, 1), (37, 1), (0, 1), (129, 1)]  # long, short, first token, one past a block edge
    nb = 40
    batch = _make_batch(reqs, bs, nb, seed=splits + d)
    kv = _rand_cache(nb, bs, hkv, d)
    q = torch.randn(len(reqs), h, d, device=DEVICE)
    ref = R.paged_attention(q, kv, batch, None, window)
    backend = TA.TritonAttentionBackend(decode_block_n=32, decode_num_splits=splits)
    out = backend.attention(q, kv, batch, None, window)
    _check(out, ref)


def test_decode_on_graph_padded_inputs():
    """The CUDA-graph runner's padded static batch (slot -1, zero block row, seq_len 1, host hint =
    max_model_len) leaves the cache alone and gives the reference result on the real rows."""
    from tokenmill.worker.graphs import CUDAGraphRunner

    h, hkv, d, bs, nb = 8, 2, 64, 16, 12
    real = _make_batch([(70, 1), (15, 1), (31, 1)], bs, nb, seed=9)
    runner = CUDAGraphRunner(lambda b: b.input_ids, max_num_seqs=8, max_blocks_per_seq=8, max_model_len=4096,
                             block_size=bs, device=DEVICE)
    padded, bucket = runner.prepare_inputs(real)
    assert bucket == 4 and padded.slot_mapping[3] == -1
    kv_ref = _rand_cache(nb, bs, hkv, d)
    kv_tri = kv_ref.clone()
    q = torch.randn(4, h, d, device=DEVICE)
    k = torch.randn(4, hkv, d, device=DEVICE)
    v = torch.randn(4, hkv, d, device=DEVICE)
    R.write_kv(kv_ref, k[:3], v[:3], real.slot_mapping)
    ref = R.paged_attention(q[:3], kv_ref, real)
    backend = TA.TritonAttentionBackend(decode_block_n=32, num_sms=64)
    assert backend.splits_for(4, hkv, 4096, torch.device(DEVICE)) > 1
    out = backend.forward(q, k, v, kv_tri, padded)
    assert torch.equal(kv_ref, kv_tri)
    _check(out[:3], ref)
    assert torch.isfinite(out[3:]).all()


def test_choose_num_splits():
    assert TA.choose_num_splits(64, 8, 32768, num_sms=132) == 1  # enough programs already
    assert TA.choose_num_splits(1, 8, 32768, num_sms=132) == 32  # batch 1, long context: capped
    assert TA.choose_num_splits(1, 8, 1024, num_sms=132) == 4  # slices of >= 256 tokens
    assert TA.choose_num_splits(1, 8, 100, num_sms=132) == 1
    assert TA.choose_num_splits(2, 8, 32768, num_sms=132) == 16  # ceil(264/16)=17 -> power of two
