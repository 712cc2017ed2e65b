"""ForwardBatch: the flat tensors one forward pass reads.

T = total tokens this step (all requests packed), B = number of requests.
Request i owns tokens query_start_loc[i] : query_start_loc[i+1]; they sit at positions
seq_lens[i] - q_len_i ... seq_lens[i] - 1 of its sequence; its K/V for positions
0 .. seq_lens[i]-1 live in the blocks block_tables[i, :ceil(seq_lens[i] / block_size)].
New K/V of token t are written at flat slot slot_mapping[t] = block_id * block_size + offset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32: context length after this step's tokens
    query_start_loc: torch.Tensor  # [B+1] int32
    logits_indices: torch.Tensor  # [N] int64: rows of the hidden states that need logits
    # host copies (the reference path loops over requests; kernels use the tensors)
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    block_size: int
    # what attention backends derive from the batch once per step rather than once per layer (masks, sub-batches)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu) if self.query_lens_cpu else 0

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu) if self.seq_lens_cpu else 0

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)


def build_forward_batch(
    token_ids: list[list[int]],
    num_computed: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    logits_for: str = "last",
) -> ForwardBatch:
    """Build a ForwardBatch from per-request lists (used by the runner and by tests).

    token_ids[i]: the tokens request i computes this step; num_computed[i]: tokens already in the
    cache before them; block_tables[i]: its block ids. logits_for = "last" (one row per request)
    or "all" (every token, for prompt logprobs / verification).
    """
    input_ids, positions, slots, qsl, seq_lens, q_lens, logits_idx = [], [], [], [0], [], [], []
    for toks, done, table in zip(token_ids, num_computed, block_tables):
        n = len(toks)
        pos = range(done, done + n)
        input_ids.extend(toks)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        start = qsl[-1]
        qsl.append(start + n)
        seq_lens.append(done + n)
        q_lens.append(n)
        if logits_for == "all":
            logits_idx.extend(range(start, start + n))
        else:
            logits_idx.append(start + n - 1)
    max_blocks = max((len(t) for t in block_tables), default=1) or 1
    bt = torch.zeros((len(block_tables), max_blocks), dtype=torch.int32)
    for i, t in enumerate(block_tables):
        if t:
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    dev = torch.device(device)
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
        positions=torch.tensor(positions, dtype=torch.long, device=dev),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
        block_tables=bt.to(dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=dev),
        seq_lens_cpu=seq_lens,
        query_lens_cpu=q_lens,
        block_size=block_size,
    )


def select_requests(batch: ForwardBatch, rows: list[int]) -> tuple[ForwardBatch, torch.Tensor]:
    """The sub-batch of requests `rows` (attention metadata only: input ids / positions / slots / logits are
    those of the selected tokens) and the indices of its tokens in `batch`'s packed token dim."""
    qsl = batch.query_start_loc.tolist()
    tok = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in rows]) if rows else torch.zeros(0, dtype=torch.long)
    q_lens = [batch.query_lens_cpu[i] for i in rows]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    idx = torch.tensor(rows, dtype=torch.long)
    dev = batch.seq_lens.device
    tok_dev = tok.to(dev)
    sub = ForwardBatch(
        input_ids=batch.input_ids.index_select(0, tok_dev), positions=batch.positions.index_select(0, tok_dev),
        slot_mapping=batch.slot_mapping.index_select(0, tok_dev),
        block_tables=batch.block_tables.index_select(0, idx.to(dev)),
        seq_lens=batch.seq_lens.index_select(0, idx.to(dev)),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        logits_indices=torch.tensor([s - 1 for s in starts[1:]], dtype=torch.long, device=dev),
        seq_lens_cpu=[batch.seq_lens_cpu[i] for i in rows], query_lens_cpu=q_lens, block_size=batch.block_size)
    return sub, tok
