"""CUDAGraphRunner: bucketing and padding on CPU; capture/replay vs eager on CUDA (skipped without)."""
from __future__ import annotations

import pytest
import torch

from tokenmill.worker.forward_batch import build_forward_batch
from tokenmill.worker.graphs import CUDAGraphRunner, bucket_for, capture_sizes


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(45) == [1, 2, 4, 8, 16, 24, 32, 40, 45]
    assert capture_sizes(256)[-3:] == [240, 248, 256]
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_bucket_for():
    sizes = capture_sizes(45)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 9, 16, 17, 41, 45)] == [1, 2, 4, 8, 16, 16, 24, 45, 45]
    assert bucket_for(46, sizes) is None


def _decode_batch(ctx: list[int], block_size: int = 4):
    tables = [[10 + 3 * i + j for j in range(-(-(c + 1) // block_size))] for i, c in enumerate(ctx)]
    return build_forward_batch([[7 + i] for i in range(len(ctx))], ctx, tables, block_size)


def test_prepare_inputs_pads_inert_rows_and_reuses_buffers():
    runner = CUDAGraphRunner(lambda b: b.input_ids, max_num_seqs=8, max_blocks_per_seq=6, max_model_len=24,
                             block_size=4, device="cpu")
    big = _decode_batch([9, 3, 14, 0, 5])
    view, bs = runner.prepare_inputs(big)
    assert bs == 8
    small = _decode_batch([5, 2, 11])  # fewer rows and a narrower block table than the previous step
    view, bs = runner.prepare_inputs(small)
    assert bs == 4 and view.num_reqs == 4
    assert view.input_ids.tolist() == [7, 8, 9, 0]
    assert view.positions.tolist() == [5, 2, 11, 0]
    assert view.slot_mapping.tolist() == small.slot_mapping.tolist() + [-1]
    assert view.seq_lens.tolist() == [6, 3, 12, 1]
    assert view.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert view.block_tables.shape == (4, 6)
    w = small.block_tables.shape[1]
    assert torch.equal(view.block_tables[:3, :w], small.block_tables)
    assert view.block_tables[3].tolist() == [0] * 6  # padded row points at block 0
    assert view.seq_lens_cpu == [24] * 4  # launch hint: the longest context
    # the static storage is shared across steps (a captured graph sees the copies)
    assert view.input_ids.data_ptr() == runner._static.input_ids.data_ptr()
    with pytest.raises(ValueError):
        runner.prepare_inputs(_decode_batch([1] * 9))
    with pytest.raises(ValueError):
        runner.prepare_inputs(build_forward_batch([[1, 2]], [0], [[0]], 4))


def test_cpu_and_enforce_eager_are_pass_through():
    calls = []

    def fwd(b):
        calls.append(b)
        return b.input_ids * 2

    batch = _decode_batch([3, 4])
    for runner in (CUDAGraphRunner(fwd, 8, 4, 16, 4, "cpu"),
                   CUDAGraphRunner(fwd, 8, 4, 16, 4, "cuda", enforce_eager=True)):
        assert not runner.enabled
        assert runner.capture() == 0
        assert not runner.can_run(batch)
        assert runner(batch).tolist() == [14, 16]
        assert calls[-1] is batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_matches_eager_on_cuda():
    pytest.importorskip("triton")
    from tokenmill.ops.attention.triton_attention import TritonAttentionBackend

    torch.manual_seed(0)
    dev = torch.device("cuda")
    vocab, hidden, h, hkv, d, bs, nb = 97, 256, 8, 2, 32, 16, 128
    emb = torch.randn(vocab, hidden, device=dev, dtype=torch.bfloat16)
    wq = torch.randn(hidden, h * d, device=dev, dtype=torch.bfloat16) / hidden ** 0.5
    wkv = torch.randn(hidden, 2 * hkv * d, device=dev, dtype=torch.bfloat16) / hidden ** 0.5
    wo = torch.randn(h * d, vocab, device=dev, dtype=torch.bfloat16) / (h * d) ** 0.5
    kv = torch.randn((2, nb, bs, hkv, d), device=dev, dtype=torch.bfloat16)
    attn = TritonAttentionBackend()

    def fwd(b):
        x = emb[b.input_ids] + b.positions[:, None].to(emb.dtype) * 1e-3
        q = (x @ wq).view(-1, h, d)
        k, v = (x @ wkv).view(-1, 2, hkv, d).unbind(1)
        o = attn.forward(q, k, v, kv, b)
        return (o.reshape(-1, h * d) @ wo).float()

    runner = CUDAGraphRunner(fwd, max_num_seqs=12, max_blocks_per_seq=8, max_model_len=128, block_size=bs,
                             device=dev)
    assert runner.capture() == len(capture_sizes(12))
    for n in (1, 3, 9, 12):
        ctx = [(17 * i + 5) % 120 for i in range(n)]
        tables = [[1 + 8 * i + j for j in range(-(-(c + 1) // bs))] for i, c in enumerate(ctx)]
        batch = build_forward_batch([[i % vocab] for i in range(n)], ctx, tables, bs, device=dev)
        assert runner.can_run(batch)
        kv_before = kv.clone()
        got = runner(batch).clone()
        kv_graph = kv.clone()
        kv.copy_(kv_before)
        want = fwd(batch)
        assert torch.equal(kv, kv_graph)  # padded rows wrote nothing
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
