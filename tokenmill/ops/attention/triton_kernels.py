"""Triton kernels for the paged KV cache of `reference.py` ([2, num_blocks, block_size, Hkv, D] per layer).

Three kernels plus a split-K reduction:
- `_write_kv_kernel`: scatter this step's K/V rows to their slots (slot < 0 = padding, skipped).
- `_prefill_kernel`: variable-length packed queries (query_start_loc) attending to each request's cached
  blocks (block_tables) with the queries at the END of their sequence (chunked prefill, prefix hits);
  causal, GQA, optional sliding window. One program = BLOCK_M queries of one head of one request.
- `_decode_kernel` + `_decode_reduce_kernel`: one query per request, flash-decoding. Each program takes
  one request, one KV head (all query heads of its GQA group packed into BLOCK_H rows) and one of
  NUM_SPLITS slices of the context; partial (max, sum, unnormalized out) are combined by the reduction.
  Grid and slice sizes depend only on device tensors and constexprs, so the launch is CUDA-graph safe.

Quantized caches (KV_QUANT constexpr; kv_quant.py): 1 = int8 with per-(token, head) float32 scales at
ks/vs_ptr [NB, BS, Hkv] (strides stride_sb, stride_so, 1); 2 = fp8 e4m3 with per-head scales ks/vs_ptr [Hkv].
K/V are quantized in the write kernel and loaded as is by the attention kernels, converted to q's dtype and
the scales applied to the scores (K) and to the probabilities (V), so no dequantized copy is ever made.

Dots use input_precision="ieee": exact for a float32 cache (no TF32), no effect on bf16/fp16 inputs.
Online softmax runs in base 2 (scores pre-multiplied by scale * log2(e)). Running maxima start at a
large finite negative so fully masked rows/tiles never produce inf - inf.
"""
from __future__ import annotations

import triton
import triton.language as tl

NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)  # initial running max (finite: masked tiles stay NaN-free)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_co, stride_ch,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
                     ks_ptr=None, vs_ptr=None, stride_sb=0, stride_so=0, KV_QUANT: tl.constexpr = 0):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    safe = tl.maximum(slot, 0)
    blk = safe // BLOCK_SIZE
    off = safe % BLOCK_SIZE
    h = tl.arange(0, BLOCK_HKV)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    m = m & (tl.zeros([BLOCK_HKV, BLOCK_D], tl.int64) + slot >= 0)
    src_k = k_ptr + t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = v_ptr + t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = blk * stride_cb + off * stride_co + h[:, None] * stride_ch + d[None, :]
    k = tl.load(src_k, mask=m, other=0.0)
    v = tl.load(src_v, mask=m, other=0.0)
    if KV_QUANT == 1:  # int8, scale = absmax / 127 per (token, head), round half away from zero
        h_ok = (h < NUM_KV_HEADS) & (tl.zeros([BLOCK_HKV], tl.int64) + slot >= 0)
        sdst = blk * stride_sb + off * stride_so + h
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        ksc = tl.maximum(tl.max(tl.abs(kf), 1), 1e-12) / 127.0
        vsc = tl.maximum(tl.max(tl.abs(vf), 1), 1e-12) / 127.0
        kq = kf / ksc[:, None]
        vq = vf / vsc[:, None]
        kq = tl.minimum(tl.maximum(tl.where(kq >= 0, tl.floor(kq + 0.5), tl.ceil(kq - 0.5)), -127.0), 127.0)
        vq = tl.minimum(tl.maximum(tl.where(vq >= 0, tl.floor(vq + 0.5), tl.ceil(vq - 0.5)), -127.0), 127.0)
        tl.store(kc_ptr + dst, kq.to(tl.int8), mask=m)
        tl.store(vc_ptr + dst, vq.to(tl.int8), mask=m)
        tl.store(ks_ptr + sdst, ksc, mask=h_ok)
        tl.store(vs_ptr + sdst, vsc, mask=h_ok)
    elif KV_QUANT == 2:  # fp8 e4m3, static per-head scales, saturated at +-448
        ksc = tl.load(ks_ptr + h, mask=h < NUM_KV_HEADS, other=1.0)
        vsc = tl.load(vs_ptr + h, mask=h < NUM_KV_HEADS, other=1.0)
        kq = tl.minimum(tl.maximum(k.to(tl.float32) / ksc[:, None], -448.0), 448.0)
        vq = tl.minimum(tl.maximum(v.to(tl.float32) / vsc[:, None], -448.0), 448.0)
        tl.store(kc_ptr + dst, kq.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(vc_ptr + dst, vq.to(vc_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=m)


@triton.jit
def _kv_scale(s_ptr, blk, kpos, k_ok, kvh, stride_sb, stride_so, BLOCK_SIZE: tl.constexpr, KV_QUANT: tl.constexpr):
    """Scales of the keys/values at positions kpos [BLOCK_N] (blocks blk) of KV head kvh -> [BLOCK_N] fp32."""
    if KV_QUANT == 1:
        return tl.load(s_ptr + blk * stride_sb + (kpos % BLOCK_SIZE) * stride_so + kvh, mask=k_ok, other=0.0)
    return tl.zeros_like(kpos).to(tl.float32) + tl.load(s_ptr + kvh)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                    sm_scale_log2, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_co, stride_ch, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    USE_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr,
                    ks_ptr=None, vs_ptr=None, stride_sb=0, stride_so=0, KV_QUANT: tl.constexpr = 0):
    req = tl.program_id(0)
    head = tl.program_id(1)
    mblk = tl.program_id(2)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    if mblk * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + req)
        ctx = seq_len - q_len  # tokens cached before this chunk
        kvh = head // GROUP
        rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
        row_ok = rows < q_len
        qpos = ctx + rows  # absolute positions [BLOCK_M]
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_ptrs = q_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        if KV_QUANT == 0:
            q = q.to(kc_ptr.dtype.element_ty)

        m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        last_q = ctx + tl.minimum((mblk + 1) * BLOCK_M, q_len) - 1  # largest position in this tile
        hi = last_q + 1
        lo = 0
        if USE_WINDOW:
            first_q = ctx + mblk * BLOCK_M
            lo = tl.maximum(first_q - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        n = tl.arange(0, BLOCK_N)
        bt_row = bt_ptr + req.to(tl.int64) * stride_bt
        for start in range(lo, hi, BLOCK_N):
            kpos = start + n  # [BLOCK_N]
            k_ok = kpos < hi
            blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
            base = blk * stride_cb + (kpos % BLOCK_SIZE) * stride_co + kvh * stride_ch  # [BLOCK_N]
            kt = tl.load(kc_ptr + base[None, :] + d[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            if KV_QUANT == 0:
                s = tl.dot(q, kt, input_precision="ieee") * sm_scale_log2  # [BLOCK_M, BLOCK_N]
            else:
                s = tl.dot(q, kt.to(q.dtype), input_precision="ieee") * sm_scale_log2
                s = s * _kv_scale(ks_ptr, blk, kpos, k_ok, kvh, stride_sb, stride_so, BLOCK_SIZE, KV_QUANT)[None, :]
            vis = (kpos[None, :] <= qpos[:, None]) & k_ok[None, :]
            if USE_WINDOW:
                vis = vis & (kpos[None, :] > qpos[:, None] - window)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vc_ptr + base[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if KV_QUANT == 0:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = p * _kv_scale(vs_ptr, blk, kpos, k_ok, kvh, stride_sb, stride_so, BLOCK_SIZE, KV_QUANT)[None, :]
                acc = acc * alpha[:, None] + tl.dot(pv.to(q.dtype), v.to(q.dtype), input_precision="ieee")
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = o_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, o_ptr, part_o_ptr, part_ml_ptr, bt_ptr, seq_lens_ptr,
                   sm_scale_log2, window,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cb, stride_co, stride_ch, stride_bt,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   ks_ptr=None, vs_ptr=None, stride_sb=0, stride_so=0, KV_QUANT: tl.constexpr = 0):
    """Query row of request r is row r of q. Partials: part_o [B, H, S, D] fp32, part_ml [B, H, S, 2]."""
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    span = seq_len - lo
    part = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start0 = lo + split * part
    end = tl.minimum(start0 + part, seq_len)

    g = tl.arange(0, BLOCK_H)
    g_ok = g < GROUP
    heads = kvh * GROUP + g  # [BLOCK_H] query heads of this KV head
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptrs = q_ptr + req.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    if KV_QUANT == 0:
        q = q.to(kc_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_H], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    for start in range(start0, end, BLOCK_N):
        kpos = start + n
        k_ok = kpos < end
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        base = blk * stride_cb + (kpos % BLOCK_SIZE) * stride_co + kvh * stride_ch
        kt = tl.load(kc_ptr + base[None, :] + d[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        if KV_QUANT == 0:
            s = tl.dot(q, kt, input_precision="ieee") * sm_scale_log2  # [BLOCK_H, BLOCK_N]
        else:
            s = tl.dot(q, kt.to(q.dtype), input_precision="ieee") * sm_scale_log2
            s = s * _kv_scale(ks_ptr, blk, kpos, k_ok, kvh, stride_sb, stride_so, BLOCK_SIZE, KV_QUANT)[None, :]
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + base[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if KV_QUANT == 0:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = p * _kv_scale(vs_ptr, blk, kpos, k_ok, kvh, stride_sb, stride_so, BLOCK_SIZE, KV_QUANT)[None, :]
            acc = acc * alpha[:, None] + tl.dot(pv.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        m_i = m_new

    st_mask = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o_ptrs = o_ptr + req.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=st_mask)
    else:
        row = (req.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(part_o_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=st_mask)
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_ml_ptr, o_ptr, stride_ot, stride_oh,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine NUM_SPLITS partials of one (request, head): out = sum_s 2^(m_s-M) acc_s / sum_s 2^(m_s-M) l_s."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    row = (req.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + s  # [BLOCK_S]
    m = tl.load(part_ml_ptr + row * 2, mask=s_ok, other=NEG_INIT)
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_o_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)  # [BLOCK_S]; empty splits have l = 0 and acc = 0
    denom = tl.sum(w * l, 0)
    denom = tl.where(denom > 0, denom, 1.0)
    out = tl.sum(acc * w[:, None], 0) / denom  # [BLOCK_D]
    o_ptrs = o_ptr + req.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)
