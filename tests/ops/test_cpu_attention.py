"""Compiled CPU paged-attention kernel (tokenmill/ops/cpu/csrc/attention.c) vs reference.paged_attention.

Random pools with shuffled block ids: decode batches of mixed lengths, GQA ratios, head dims, block sizes,
sliding windows, prefill chunks over cached prefixes mixed with decodes, batch-1 long contexts (split-K),
bf16/fp16 pools; plus greedy tokens of a tiny model with attention_backend="cpu" equal to "reference".
Skipped only when the library cannot be built on this machine.
"""
from __future__ import annotations

import random

import pytest
import torch

from tokenmill.ops.attention import reference as R
from tokenmill.ops.cpu.attention import (cpu_attention_available, cpu_paged_attention, prefill_kernel_name,
                                         prefill_kernel_supports, supports_kv_dtype)
from tokenmill.ops.cpu.build import build_error
from tests.ops.paged_batch import random_paged_batch
from tokenmill.worker.forward_batch import ForwardBatch

pytestmark = pytest.mark.skipif(not cpu_attention_available(),
                                reason=f"CPU attention kernel cannot be built: {build_error('attention')}")


def _make_batch(reqs: list[tuple[int, int]], block_size: int, num_blocks: int, seed: int) -> ForwardBatch:
    return random_paged_batch(reqs, block_size, num_blocks, seed)


def _run(reqs, h, hkv, d, bs, window=None, kv_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    nb = sum(-(-(c + n) // bs) for c, n in reqs) + 7  # a few blocks nobody owns
    batch = _make_batch(reqs, bs, nb, seed)
    kv = torch.randn((2, nb, bs, hkv, d)).to(kv_dtype)
    q = torch.randn((batch.num_tokens, h, d))
    scale = d ** -0.5
    want = R.paged_attention(q, kv.float(), batch, scale, window)
    got = cpu_paged_attention(q, kv, batch, scale, window)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    return got


DECODE_LENS = [1, 2, 15, 16, 17, 33, 64, 100, 255, 257, 300]


@pytest.mark.parametrize("h,hkv", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 32])
def test_decode_batches_of_mixed_lengths(h, hkv, d, bs):
    _run([(n - 1, 1) for n in DECODE_LENS], h, hkv, d, bs, seed=h + d + bs)


@pytest.mark.parametrize("window", [1, 7, 40, 4096])
def test_sliding_window(window):
    _run([(n - 1, 1) for n in DECODE_LENS] + [(50, 37), (0, 45)], 8, 2, 64, 16, window=window)


def test_prefill_chunks_over_cached_prefixes_mixed_with_decodes():
    reqs = [(0, 70), (129, 1), (200, 45), (16, 16), (5, 1), (0, 1), (31, 80)]
    _run(reqs, 9, 3, 64, 16)
    _run(reqs, 8, 2, 128, 32, seed=1)


@pytest.mark.parametrize("window", [None, 50])
def test_backend_bf16_prefill_split(window):
    """CpuAttentionBackend(prefill_dtype=bf16): chunks of >= 64 queries attend in bf16 (the AMX prefill kernel where
    it runs, else SDPA), the rest of the step through the kernel (bit-equal to the kernel alone); with prefill_dtype
    None it is the kernel alone."""
    from tokenmill.ops.attention.backend import PREFILL_MIN_TOKENS, CpuAttentionBackend

    reqs = [(0, 70), (129, 1), (200, 64), (16, 16), (5, 1), (31, 130), (0, 63)]
    h, hkv, d, bs = 9, 3, 64, 16
    torch.manual_seed(0)
    nb = sum(-(-(c + n) // bs) for c, n in reqs) + 3
    batch = _make_batch(reqs, bs, nb, seed=4)
    q, k, v = torch.randn(batch.num_tokens, h, d), torch.randn(batch.num_tokens, hkv, d), torch.randn(batch.num_tokens, hkv, d)
    kv0 = torch.randn((2, nb, bs, hkv, d))
    want = R.paged_attention(q, _written(kv0, k, v, batch), batch, d ** -0.5, window)
    kernel = CpuAttentionBackend().forward(q, k, v, kv0.clone(), batch, d ** -0.5, window)
    got = CpuAttentionBackend(prefill_dtype=torch.bfloat16).forward(q, k, v, kv0.clone(), batch, d ** -0.5, window)
    assert got.dtype == torch.float32
    long = torch.cat([torch.full((n,), n >= PREFILL_MIN_TOKENS) for _, n in reqs])
    assert torch.equal(got[~long], kernel[~long])  # short chunks and decodes: the kernel, untouched
    assert not torch.equal(got[long], kernel[long])  # long chunks: really the bf16 path
    torch.testing.assert_close(got[long], want[long], rtol=0.05, atol=0.03)
    torch.testing.assert_close(kernel, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("seq_len", [1, 37, 48])
def test_gather_kv_bf16_equals_reference_gather_then_conversion(seq_len):
    from tokenmill.ops.cpu.attention import gather_kv_bf16

    torch.manual_seed(seq_len)
    kv = torch.randn(2, 9, 16, 3, 64)
    ids = torch.tensor([7, 2, 5, 0], dtype=torch.int32)
    k, v = gather_kv_bf16(kv, ids, seq_len)
    rk, rv = R.gather_kv(kv, ids, seq_len)
    assert k.dtype == torch.bfloat16 and k.shape == (seq_len, 3, 64)
    assert torch.equal(k, rk.to(torch.bfloat16)) and torch.equal(v, rv.to(torch.bfloat16))
    with pytest.raises(ValueError, match="out of range"):
        gather_kv_bf16(kv, torch.tensor([9, 0, 0, 0]), seq_len)


def _written(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    out = kv.clone()
    R.write_kv(out, k, v, batch.slot_mapping)
    return out


def test_batch_one_long_context_split_k():
    _run([(2999, 1)], 9, 3, 64, 16)  # decode: 3 items split over the key range
    _run([(2048, 200)], 9, 3, 64, 16, seed=2)  # shared-prefix chunk
    _run([(1500, 3)], 4, 1, 128, 32, window=1000, seed=3)


def test_odd_head_dims_and_block_sizes_take_the_plain_path():
    _run([(30, 5), (3, 1), (0, 9)], 4, 2, 20, 4)  # D % 8 != 0
    _run([(30, 5), (3, 1), (90, 1)], 4, 1, 80, 8, window=8)  # D % 16 == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pools(dtype):
    if not supports_kv_dtype(dtype):
        pytest.skip(f"kernel built without {dtype} support")
    _run([(n - 1, 1) for n in DECODE_LENS] + [(40, 20)], 9, 3, 64, 16, kv_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 33])
def test_many_decodes_one_item_per_request(dtype, window):
    """With at least 4 decodes a thread (any machine up to 32 threads here), each decode is one work item over
    all its KV heads (whole K/V rows); with prefill chunks in the same step, and a batch too small for that."""
    if not supports_kv_dtype(dtype):
        pytest.skip(f"kernel built without {dtype} support")
    lens = [(7 * i) % 300 + 1 for i in range(130)]
    _run([(n - 1, 1) for n in lens] + [(64, 20)], 9, 3, 64, 16, window=window, kv_dtype=dtype)
    _run([(n - 1, 1) for n in lens[:3]], 8, 2, 128, 32, window=window, kv_dtype=dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_only_steps_split_by_keys_across_threads(threads, dtype):
    """A step of decodes only runs as one contiguous run of items per thread (about equal key counts, each with a
    prefetch frontier across its items): every request is attended once whatever the thread count, including
    lengths far apart (one run gets few long items, another many short ones) and a sliding window."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lens = [2000, 1, 3, 1500] + [(13 * i) % 90 + 1 for i in range(40)]
        _run([(n - 1, 1) for n in lens], 9, 3, 64, 16, kv_dtype=dtype)
        _run([(n - 1, 1) for n in reversed(lens)], 8, 2, 64, 16, window=50, kv_dtype=dtype)
    finally:
        torch.set_num_threads(old)


def test_strided_query_and_bf16_query():
    """q as a view of a packed qkv projection (token stride > H * D), and a bf16 q."""
    torch.manual_seed(0)
    batch = _make_batch([(10, 3), (40, 1)], 16, 12, 0)
    kv = torch.randn((2, 12, 16, 2, 32))
    qkv = torch.randn((batch.num_tokens, 8 * 32))
    q = qkv[:, :4 * 32].view(-1, 4, 32)
    want = R.paged_attention(q, kv, batch, 0.3, None)
    torch.testing.assert_close(cpu_paged_attention(q, kv, batch, 0.3, None), want, rtol=1e-5, atol=2e-6)
    got16 = cpu_paged_attention(q.bfloat16(), kv, batch, 0.3, None)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), R.paged_attention(q.bfloat16().float(), kv, batch, 0.3, None),
                               rtol=1e-2, atol=1e-2)


def test_bad_inputs_raise():
    batch = _make_batch([(10, 1)], 16, 4, 0)
    kv = torch.randn((2, 4, 16, 2, 32))
    q = torch.randn((1, 4, 32))
    with pytest.raises(ValueError, match="heads"):
        cpu_paged_attention(torch.randn((1, 3, 32)), kv, batch)
    with pytest.raises(ValueError, match="block size"):
        cpu_paged_attention(q, torch.randn((2, 4, 8, 2, 32)), batch)
    with pytest.raises(ValueError, match="tokens"):
        cpu_paged_attention(torch.randn((2, 4, 32)), kv, batch)
    with pytest.raises(ValueError, match="cannot read"):
        cpu_paged_attention(q, kv.to(torch.int16), batch)
    with pytest.raises(ValueError, match="needs its scales"):  # int8 / fp8: a QuantizedKVCache
        cpu_paged_attention(q, kv.to(torch.int8), batch)
    batch.block_tables[0, 0] = 99
    with pytest.raises(ValueError, match="block id"):
        cpu_paged_attention(q, kv, batch)


def test_engine_greedy_tokens_match_reference(tmp_path, gguf_tokenizer_path):
    """Tiny random-weight llama (GQA) and mistral (sliding window): chunked prefill, prefix caching, decode."""
    from tests.model.tiny_models import VOCAB, save_tiny_model
    from tokenmill import LLM, SamplingParams

    rng = random.Random(0)
    shared = [rng.randrange(3, VOCAB) for _ in range(24)]
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (20, 3, 11)]
    prompts.append([rng.randrange(3, VOCAB) for _ in range(9)])
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for arch in ("llama", "mistral"):
        path = save_tiny_model(arch, str(tmp_path / arch))
        toks = {}
        for backend in ("reference", "cpu"):
            llm = LLM(path, tokenizer=gguf_tokenizer_path, dtype="float32", device="cpu", block_size=8,
                      max_num_batched_tokens=32, max_num_seqs=4, attention_backend=backend)
            assert llm.engine.core.runner.device_setup.backend_name == backend
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            toks[backend] = [list(o.outputs[0].token_ids) for o in outs]
        assert all(len(t) == 12 for t in toks["cpu"])
        assert toks["cpu"] == toks["reference"], arch


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        return set()


def test_a_prefill_kernel_runs_wherever_the_cpu_has_bf16_dot_products():
    """The prefill attention kernel (test_cpu_prefill_attention.py): AMX where Linux grants the tile state, else
    vdpbf16ps, so any AVX512-BF16 CPU runs one (a build that lost it would fall back to bf16 SDPA, 3-6x slower)."""
    flags = _cpu_flags()
    if "avx512_bf16" not in flags:
        pytest.skip("no AVX512-BF16 on this CPU")
    assert prefill_kernel_name() in ("amx", "avx512-bf16")
    if "amx_bf16" not in flags:
        assert prefill_kernel_name() == "avx512-bf16"
    assert prefill_kernel_supports(torch.float32, 128) and prefill_kernel_supports(torch.bfloat16, 64)
