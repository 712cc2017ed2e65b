"""Pure-PyTorch multi-head latent attention (DeepSeek MLA) over the paged cache, in the absorbed form.

A token's cache row is its compressed latent: c_kv (kv_lora_rank values, after kv_a_layernorm) followed by its
roped k_pe (qk_rope_head_dim values), R + P values in all. It lives in the ordinary paged cache of
reference.py, [2, num_blocks, block_size, 1, D] with D = (R + P) / 2: the first D values of the row in the K
plane, the other D in the V plane, at the token's slot. Block pool, prefix caching, preemption, swapping and KV
transfer see a one-KV-head cache and need nothing else. int8 / fp8 caches (kv_quant.py) hold the two halves
quantized like one K head and one V head.

Attention never expands the latent back to per-head K/V: the queries arrive already absorbed, q = [q_nope W_UK |
q_pe] [T, H, R + P], so score(t, s) = q . row(s) and the output is the latent P . c_kv [T, H, R] (the caller
applies W_UV per head, then o_proj).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.ops.attention.kv_quant import QuantizedKVCache, compact_dequantized, write_kv_quantized
from tokenmill.ops.attention.reference import _causal_mask, write_kv
from tokenmill.worker.forward_batch import ForwardBatch


def write_latent(kv_cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store latent rows [T, 2D] at their slots (first half in the K plane, second in the V plane)."""
    d = kv_cache.shape[-1]
    if latent.shape[-1] != 2 * d or kv_cache.shape[-2] != 1:
        raise ValueError(f"latent rows of {latent.shape[-1]} values do not fit a cache of shape "
                         f"{tuple(kv_cache.shape)}")
    t = latent.shape[0]
    write_kv(kv_cache, latent[:, :d].reshape(t, 1, d), latent[:, d:].reshape(t, 1, d), slot_mapping)


def mla_attention(q: torch.Tensor, rows: torch.Tensor, kv_cache, batch: ForwardBatch, scale: float,
                  latent_dim: int) -> torch.Tensor:
    """Store this step's latent rows [T, 2D] at their slots, then mla_paged_attention. An int8 / fp8 cache
    (kv_quant.QuantizedKVCache) quantizes each half of a row like a K / V head on write (int8: one scale per
    half, fp8: the plane's static scale) and is read through a compact dequantized copy of the blocks the batch
    reads."""
    if isinstance(kv_cache, QuantizedKVCache):
        t, d = rows.shape[0], rows.shape[-1] // 2
        write_kv_quantized(kv_cache, rows[:, :d].reshape(t, 1, d), rows[:, d:].reshape(t, 1, d),
                           batch.slot_mapping)
        kv_cache, batch = compact_dequantized(kv_cache, batch, q.dtype)
    else:
        write_latent(kv_cache, rows, batch.slot_mapping)
    return mla_paged_attention(q, kv_cache, batch, scale, latent_dim)


def _rows(kv_cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """The latent rows of positions 0 .. length-1 of each block table in tables [B, >= nblk] -> [B, length, 2D]."""
    _, nb, bs, _, d = kv_cache.shape
    nblk = (length + bs - 1) // bs
    b = tables.shape[0]
    flat = tables[:, :nblk].reshape(-1).long()
    kv = kv_cache.view(2, nb, bs * d).index_select(1, flat).view(2, b, nblk * bs, d)[:, :, :length]
    return torch.cat((kv[0], kv[1]), dim=-1)  # [B, length, 2D]


def mla_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch, scale: float,
                        latent_dim: int) -> torch.Tensor:
    """Causal attention of the absorbed queries q [T, H, R + P] over each request's cached latent rows (this
    step's rows already written). Returns the attention-weighted latents [T, H, R] (R = latent_dim).

    Decode rows (one query) are batched into one padded call; prefill chunks run one by one, causal within the
    chunk (query j of a chunk of n sits at position seq_len - n + j)."""
    t, h, _ = q.shape
    out = q.new_empty(t, h, latent_dim)
    starts = [0]
    for n in batch.query_lens_cpu:
        starts.append(starts[-1] + n)
    decode = [i for i, n in enumerate(batch.query_lens_cpu) if n == 1]
    if decode:
        _decode(q, kv_cache, batch, decode, starts, scale, latent_dim, out)
    for i, (n, seq_len) in enumerate(zip(batch.query_lens_cpu, batch.seq_lens_cpu)):
        if n <= 1:
            continue
        s = starts[i]
        rows = _rows(kv_cache, batch.block_tables[i:i + 1], seq_len).to(q.dtype)  # [1, L, R + P]
        qi = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, R + P]
        k, v = rows.unsqueeze(1), rows[..., :latent_dim].unsqueeze(1)  # [1, 1, L, R + P], [1, 1, L, R]
        mask = None
        if n != seq_len:  # a later chunk: causal against its own position, the whole cached context before it
            mask = batch.memo.get(("mla_mask", n, seq_len))
            if mask is None:
                mask = batch.memo[("mla_mask", n, seq_len)] = _causal_mask(n, seq_len, None, q.device)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)  # [1, H, n, R]
        out[s:s + n] = o[0].transpose(0, 1)
    return out


def _decode(q, kv_cache, batch, rows, starts, scale, latent_dim, out) -> None:
    """One query per sequence: one padded gather of the latent rows, one SDPA call, padding masked. The index
    tensors and the mask are made once a step (batch.memo), not once a layer."""
    lens = [batch.seq_lens_cpu[i] for i in rows]
    max_len = max(lens)
    meta = batch.memo.get("mla_decode")
    if meta is None:
        tables = batch.block_tables.index_select(0, torch.tensor(rows, device=q.device))  # [B, max_blocks]
        tok = torch.tensor([starts[i] for i in rows], device=q.device)
        mask = None
        if min(lens) != max_len:
            mask = torch.arange(max_len, device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]
            mask = mask[:, None, None, :]  # [B, 1, 1, L]
        meta = batch.memo["mla_decode"] = (tables, tok, mask)
    tables, tok, mask = meta
    cached = _rows(kv_cache, tables, max_len).to(q.dtype)  # [B, L, R + P]
    k, v = cached.unsqueeze(1), cached[..., :latent_dim].unsqueeze(1)  # [B, 1, L, R + P], [B, 1, L, R]
    qb = q.index_select(0, tok).unsqueeze(2)  # [B, H, 1, R + P]
    o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)  # [B, H, 1, R]
    out.index_copy_(0, tok, o[:, :, 0])
