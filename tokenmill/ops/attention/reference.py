"""Pure-PyTorch paged attention: the CPU path and the oracle every fast kernel is tested against.

KV cache of one layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = keys, 1 = values). A token's K/V live at flat slot block_id * block_size + offset.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tokenmill.worker.forward_batch import ForwardBatch


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    return [torch.zeros((2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
            for _ in range(num_layers)]


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] at their slots. Slots < 0 are padding and skipped."""
    _, nb, bs, hkv, d = kv_cache.shape
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    kv_cache[0].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of one sequence: [seq_len, Hkv, D] each."""
    _, nb, bs, hkv, d = kv_cache.shape
    nblk = (seq_len + bs - 1) // bs
    ids = block_ids[:nblk].long()
    # one row-gather of flat blocks (index_select on a 2-D view is a plain memcpy per row; on the 4-D
    # tensor it takes a much slower generic path)
    kv = kv_cache.view(2, nb, bs * hkv * d).index_select(1, ids).view(2, nblk * bs, hkv, d)[:, :seq_len]
    return kv[0], kv[1]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          is_causal: bool, scale: float) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> [B, H, Lq, D] (GQA without copying K/V heads)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: Optional[float] = None,
                    sliding_window: Optional[int] = None, gather: Optional[Callable] = None) -> torch.Tensor:
    """Causal attention of the packed queries q [T, H, D] over each request's cached K/V.

    The K/V of this step's tokens must already be written (write_kv). Returns [T, H, D].
    Decode rows (one query) are batched into one padded call; prefill chunks run one by one, their K/V
    gathered by `gather` (default gather_kv; a backend may pass one that also converts to q's dtype).
    """
    gather = gather or gather_kv
    t, h, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty_like(q)
    starts = [0]
    for n in batch.query_lens_cpu:
        starts.append(starts[-1] + n)
    decode_rows = [i for i, n in enumerate(batch.query_lens_cpu) if n == 1]
    if decode_rows:
        _decode_batched(q, kv_cache, batch, decode_rows, starts, scale, sliding_window, out)
        decode_set = set(decode_rows)
    else:
        decode_set = set()
    for i, (n, seq_len) in enumerate(zip(batch.query_lens_cpu, batch.seq_lens_cpu)):
        if i in decode_set or n == 0:
            continue
        s = starts[i]
        k, v = gather(kv_cache, batch.block_tables[i], seq_len)
        qi = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        ki = k.transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, Hkv, L, D]
        vi = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
        mask = None
        causal = False
        if sliding_window is not None or (n > 1 and n != seq_len):
            key = ("mask", n, seq_len, sliding_window, q.dtype)
            mask = batch.memo.get(key)
            if mask is None:  # additive, in q's dtype: SDPA would convert a bool mask in every layer
                allowed = _causal_mask(n, seq_len, sliding_window, q.device)
                mask = batch.memo[key] = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(
                    ~allowed, float("-inf"))
        elif n > 1:
            causal = True
        out[s:s + n] = _sdpa(qi, ki, vi, mask, causal, scale)[0].transpose(0, 1)
    return out


def _causal_mask(n: int, seq_len: int, window: Optional[int], device) -> torch.Tensor:
    """[n, seq_len] bool: query j (at position seq_len - n + j) sees keys <= its position."""
    qpos = torch.arange(seq_len - n, seq_len, device=device)[:, None]
    kpos = torch.arange(seq_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def _decode_batched(q, kv_cache, batch, rows, starts, scale, window, out) -> None:
    """One query per sequence: one padded row-gather of K and V together, then one SDPA call with the
    G = H / Hkv query heads of a KV head folded into the query-length dim (GQA without copying K/V heads)."""
    _, nb, bs, hkv, d = kv_cache.shape
    lens = [batch.seq_lens_cpu[i] for i in rows]
    max_len = max(lens)
    nblk = (max_len + bs - 1) // bs
    b, h = len(rows), q.shape[1]
    if len(rows) == batch.num_reqs:
        tables, tok = batch.block_tables[:, :nblk], batch.query_start_loc[:-1].long()
    else:
        idx = torch.tensor(rows, device=q.device)
        tables = batch.block_tables.index_select(0, idx)[:, :nblk]  # [B, nblk]
        tok = torch.tensor([starts[i] for i in rows], device=q.device)
    flat = tables.reshape(-1).long()
    kv = kv_cache.view(2, nb, bs * hkv * d).index_select(1, flat).view(2, b, nblk * bs, hkv, d)
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    k = kv[0, :, :max_len].transpose(1, 2)  # [B, Hkv, L, D] (a view)
    v = kv[1, :, :max_len].transpose(1, 2)
    qb = q.index_select(0, tok).view(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
    mask = None
    if min(lens) != max_len or window is not None:
        lens_t = torch.tensor(lens, device=q.device)
        kpos = torch.arange(max_len, device=q.device)[None, :]
        m = kpos < lens_t[:, None]
        if window is not None:
            m &= kpos > (lens_t[:, None] - 1 - window)
        mask = m[:, None, None, :]  # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G, D]
    out.index_copy_(0, tok, o.reshape(b, h, d))


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Plain causal attention of one sequence, q [L, H, D], k/v [L, Hkv, D]: a second oracle for tests."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    o = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, True, scale)
    return o[0].transpose(0, 1)
