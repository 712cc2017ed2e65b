"""The grammar-bitmask stage of sampling: logits of tokens a request's grammar disallows become -inf.

A bitmask row is int32 [ceil(V / 32)]: token t is allowed when bit (t % 32) of word (t // 32) is set
(xgrammar's layout). Applied to every sampled row before anything else in the sampler, greedy included,
and to every draft position that speculation verifies. `apply_token_bitmask_reference` is the plain-Python
oracle of the vectorized `apply_token_bitmask_`.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch


def unpack_bitmask(bitmask: Union[np.ndarray, torch.Tensor], vocab_size: int,
                   device: Union[str, torch.device] = "cpu", banned: bool = False) -> torch.Tensor:
    """int32 bitmask [R, W] -> bool [R, vocab_size] on `device`: allowed tokens (banned=True: disallowed
    ones). Ids past 32 W are disallowed."""
    if isinstance(bitmask, np.ndarray) and torch.device(device).type == "cpu":
        packed = np.ascontiguousarray(bitmask, dtype=np.int32)
        if banned:
            packed = ~packed
        bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")  # [R, 32 W]: low bit first
        out = torch.from_numpy(bits).view(torch.bool)
    else:
        bm = torch.as_tensor(bitmask, dtype=torch.int32).to(device)
        if banned:
            bm = ~bm
        shifts = torch.arange(32, dtype=torch.int32, device=bm.device)
        out = ((bm[:, :, None] >> shifts) & 1).bool().reshape(bm.shape[0], -1)  # [R, 32 W]
    R, n = out.shape
    if n >= vocab_size:
        return out[:, :vocab_size]
    return torch.cat([out, out.new_full((R, vocab_size - n), banned)], dim=1)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: Union[np.ndarray, torch.Tensor],
                         rows: Sequence[int]) -> torch.Tensor:
    """In place: logits[rows[i], t] = -inf where bitmask row i disallows token t. logits [N, V]."""
    rows = list(rows)
    if not rows:
        return logits
    banned = unpack_bitmask(bitmask, logits.shape[1], logits.device, banned=True)  # [R, V]
    if rows == list(range(logits.shape[0])):  # every row, in order: one op
        return logits.masked_fill_(banned, float("-inf"))
    for i, r in enumerate(rows):  # row views: no gather / scatter copies of the logits
        logits[r].masked_fill_(banned[i], float("-inf"))
    return logits


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: Union[np.ndarray, torch.Tensor],
                                  rows: Sequence[int]) -> torch.Tensor:
    """The oracle: one token at a time, plain Python ints (slow; tests only). Returns a new tensor."""
    out = logits.clone()
    words = [[int(w) & 0xFFFFFFFF for w in row] for row in torch.as_tensor(bitmask).tolist()]
    for i, r in enumerate(rows):
        for t in range(out.shape[1]):
            w = t // 32
            if w >= len(words[i]) or not (words[i][w] >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out
