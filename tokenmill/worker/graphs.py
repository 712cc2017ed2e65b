"""CUDA-graph capture and replay of the decode forward, one graph per padded batch size.

A decode step launches hundreds of small kernels; on a GPU their launch cost dominates small batches.
`CUDAGraphRunner` captures `forward_fn(batch)` once per bucket size (1, 2, 4, 8, 16, 24, ... up to
max_num_seqs) on static input buffers and replays the smallest bucket that fits a decode-only batch.
Padded rows are inert: slot -1 (write_kv skips them), block table row of zeros (block 0), seq_len 1.

The captured forward must read only device tensors of the batch (the Triton backend does; the
reference backend builds tensors from the host lists and must not be captured). The host lists of the
static batch carry launch hints for the worst case: seq_lens_cpu = max_model_len, so the decode
kernel's split count is chosen for the longest context.

On CPU, or with enforce_eager, the runner is a pass-through: `runner(batch) == forward_fn(batch)`.
"""
from __future__ import annotations

import bisect
from typing import Callable, Optional

import torch

from tokenmill.worker.forward_batch import ForwardBatch

ForwardFn = Callable[[ForwardBatch], torch.Tensor]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Bucket sizes: 1, 2, 4, 8, then every 8 up to max_num_seqs (which is always included)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def bucket_for(num_reqs: int, sizes: list[int]) -> Optional[int]:
    """Smallest captured size >= num_reqs, or None when the batch is larger than every graph."""
    i = bisect.bisect_left(sizes, num_reqs)
    return sizes[i] if i < len(sizes) else None


class CUDAGraphRunner:
    """Per-bucket CUDA graphs of a decode forward with an eager fallback.

    forward_fn(batch) -> Tensor [T, ...]: the model's forward over a ForwardBatch (KV caches bound).
    Nothing touches the device until `capture()` (or `prepare_inputs()`) is called.
    """

    def __init__(self, forward_fn: ForwardFn, max_num_seqs: int, max_blocks_per_seq: int, max_model_len: int,
                 block_size: int, device: torch.device | str, enforce_eager: bool = False,
                 sizes: Optional[list[int]] = None, num_warmup: int = 2):
        self.forward_fn = forward_fn
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = torch.device(device)
        self.enforce_eager = enforce_eager
        self.num_warmup = num_warmup
        self._static: Optional[ForwardBatch] = None
        self._graphs: dict[int, "torch.cuda.CUDAGraph"] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        """Graphs are used only on CUDA and without enforce_eager."""
        return not self.enforce_eager and self.device.type == "cuda"

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        if self.can_run(batch):
            return self.replay(batch)
        return self.forward_fn(batch)

    def can_run(self, batch: ForwardBatch) -> bool:
        """A captured graph fits: decode-only, few enough requests, block table narrow enough."""
        if not self._graphs or not batch.num_reqs or not batch.is_decode_only:
            return False
        if batch.num_tokens != batch.num_reqs or batch.block_tables.shape[1] > self.max_blocks_per_seq:
            return False
        bs = bucket_for(batch.num_reqs, self.sizes)
        return bs is not None and bs in self._graphs

    # -- static inputs (pure torch: also runs on CPU) --------------------------------------------

    def _alloc(self) -> ForwardBatch:
        n, dev = self.sizes[-1], self.device
        return ForwardBatch(
            input_ids=torch.zeros(n, dtype=torch.long, device=dev),
            positions=torch.zeros(n, dtype=torch.long, device=dev),
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros((n, self.max_blocks_per_seq), dtype=torch.int32, device=dev),
            seq_lens=torch.ones(n, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
            logits_indices=torch.arange(n, dtype=torch.long, device=dev),
            seq_lens_cpu=[self.max_model_len] * n,
            query_lens_cpu=[1] * n,
            block_size=self.block_size,
        )

    def _view(self, bs: int) -> ForwardBatch:
        """The first bs rows of the static buffers (views: a graph captured on them sees later copies)."""
        st = self._static
        assert st is not None
        return ForwardBatch(
            input_ids=st.input_ids[:bs], positions=st.positions[:bs], slot_mapping=st.slot_mapping[:bs],
            block_tables=st.block_tables[:bs], seq_lens=st.seq_lens[:bs],
            query_start_loc=st.query_start_loc[:bs + 1], logits_indices=st.logits_indices[:bs],
            seq_lens_cpu=[self.max_model_len] * bs, query_lens_cpu=[1] * bs, block_size=self.block_size)

    def prepare_inputs(self, batch: ForwardBatch) -> tuple[ForwardBatch, int]:
        """Copy a decode batch into the static buffers, pad to its bucket; return (static view, bucket)."""
        n = batch.num_reqs
        bs = bucket_for(n, self.sizes)
        if bs is None or not batch.is_decode_only:
            raise ValueError(f"batch of {n} requests does not fit a decode graph (sizes up to {self.sizes[-1]})")
        if self._static is None:
            self._static = self._alloc()
        st = self._static
        w = batch.block_tables.shape[1]
        st.input_ids[:n].copy_(batch.input_ids)
        st.positions[:n].copy_(batch.positions)
        st.slot_mapping[:n].copy_(batch.slot_mapping)
        st.seq_lens[:n].copy_(batch.seq_lens)
        st.block_tables[:n, :w].copy_(batch.block_tables)
        if n < bs:  # padding rows: inert
            st.input_ids[n:bs].zero_()
            st.positions[n:bs].zero_()
            st.slot_mapping[n:bs].fill_(-1)
            st.seq_lens[n:bs].fill_(1)
            st.block_tables[n:bs].zero_()
        return self._view(bs), bs

    # -- CUDA graphs ------------------------------------------------------------------------------

    def capture(self) -> int:
        """Capture one graph per bucket (largest first, sharing one memory pool); no-op when disabled.

        Returns the number of graphs captured.
        """
        if not self.enabled:
            return 0
        if self._static is None:
            self._static = self._alloc()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            view = self._view(bs)  # static buffers hold padding values: warm-up writes nothing
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.num_warmup):
                    self.forward_fn(view)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward_fn(view)
            self._graphs[bs] = graph
            self._outputs[bs] = out
        torch.cuda.synchronize(self.device)
        return len(self._graphs)

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Run a decode batch through its bucket's graph; returns the first num_reqs output rows."""
        _, bs = self.prepare_inputs(batch)
        self._graphs[bs].replay()
        return self._outputs[bs][: batch.num_reqs]
