"""Pure-PyTorch batched LoRA: the oracle the CPU and Triton paths are tested against (see __init__.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass
class LoRALayout:
    """Which adapter slot each row of one step uses, in the shapes each op wants; built once per step.

    row_slots [T] int64 (-1: base); the step's requests as segments (start, length, slot), split into
    decode rows (length 1: BGMV) and prompt segments (SGMV); groups: slot -> its rows (the CPU path)."""

    row_slots: Tensor
    seg_starts: list[int]
    seg_lens: list[int]
    seg_slots: list[int]
    groups: dict[int, Tensor] = field(default_factory=dict)
    group_spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (start, end) if contiguous
    device_tensors: dict = field(default_factory=dict, repr=False)  # per-op device copies, made once per step

    @classmethod
    def build(cls, req_slots: list[int], query_lens: list[int], device: torch.device | str = "cpu") -> "LoRALayout":
        """req_slots[i]: the slot of request i (-1: base); query_lens[i]: its tokens this step (batch order)."""
        starts, lens, slots, rows = [], [], [], []
        pos = 0
        for s, n in zip(req_slots, query_lens):
            rows.extend([s] * n)
            if s >= 0 and n > 0:
                starts.append(pos)
                lens.append(n)
                slots.append(s)
            pos += n
        row_slots = torch.tensor(rows, dtype=torch.long)
        groups: dict[int, Tensor] = {}
        spans: dict[int, tuple[int, int]] = {}
        for s in sorted(set(slots)):
            idx = torch.nonzero(row_slots == s).flatten()
            groups[s] = idx.to(device)
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if hi - lo == idx.numel():
                spans[s] = (lo, hi)
        return cls(row_slots.to(device), starts, lens, slots, groups, spans)

    @property
    def is_empty(self) -> bool:
        return not self.seg_slots

    def decode_and_prompt(self) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """(decode rows as (row, slot), prompt segments as (start, length, slot))."""
        dec, pre = [], []
        for st, n, s in zip(self.seg_starts, self.seg_lens, self.seg_slots):
            if n == 1:
                dec.append((st, s))
            else:
                pre.append((st, n, s))
        return dec, pre


def bgmv_reference(y: Tensor, x: Tensor, a: Tensor, b: Tensor, rows: Tensor, slots: Tensor) -> None:
    """y[rows[i]] += x[rows[i]] @ a[slots[i]] @ b[slots[i]]: one adapter per row (gathered), in place."""
    if rows.numel() == 0:
        return
    xs = x.index_select(0, rows).unsqueeze(1)  # [n, 1, in]
    h = torch.bmm(xs, a.index_select(0, slots))  # [n, 1, K]
    d = torch.bmm(h, b.index_select(0, slots)).squeeze(1)  # [n, out]
    y.index_add_(0, rows, d.to(y.dtype))


def sgmv_reference(y: Tensor, x: Tensor, a: Tensor, b: Tensor, starts: list[int], lens: list[int],
                   slots: list[int]) -> None:
    """y[s:s+n] += x[s:s+n] @ a[slot] @ b[slot] for each segment (start s, length n, slot), in place."""
    for s, n, slot in zip(starts, lens, slots):
        if n == 0:
            continue
        y[s:s + n] += ((x[s:s + n] @ a[slot]) @ b[slot]).to(y.dtype)


def lora_reference(y: Tensor, x: Tensor, a: Tensor, b: Tensor, layout: LoRALayout) -> None:
    """Punica's split: BGMV over the decode rows, SGMV over the prompt segments."""
    dec, pre = layout.decode_and_prompt()
    if dec:
        rows = torch.tensor([r for r, _ in dec], dtype=torch.long, device=x.device)
        slots = torch.tensor([s for _, s in dec], dtype=torch.long, device=x.device)
        bgmv_reference(y, x, a, b, rows, slots)
    if pre:
        sgmv_reference(y, x, a, b, [p[0] for p in pre], [p[1] for p in pre], [p[2] for p in pre])
