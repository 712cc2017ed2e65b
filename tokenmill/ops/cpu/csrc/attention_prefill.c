/* Prefill attention on the AMX tile unit (bf16 products, float32 softmax and sums): the paged attention of
 * tm_paged_attention (attention.c; same arguments and results up to bf16 rounding) for requests with many query
 * tokens, where the float32 kernel is bound by its multiply-adds and bf16 SDPA by its per-request gathers.
 *
 * Work item = (request, KV head, up to TQ query tokens); its rows are the tokens x the G query heads sharing the KV
 * head, in row tiles of 16 tokens of one head. Keys go by in chunks of KC = 64 positions read through the block
 * table: K tile-loaded straight from a bf16 pool whose blocks hold whole 16-key tiles (else staged as bf16 rows),
 * V transposed once per chunk; every row tile of the item uses them. Everything is computed transposed, so that a
 * row tile's 16 queries are the 16 lanes of a vector:
 *   S^T [keys x 16 rows] = K . Q^T           (A: K rows; B: the item's Q packed in pair layout once)
 *   online softmax down the key axis in float32 (one vector per key: max, exp, sum are lane-wise, no reductions
 *   across lanes; causal / sliding-window masks compare a key's position with the 16 row positions)
 *   O^T [D x 16 rows] += V^T . P^T           (B: P^T in pair layout; O^T kept in float32 in the item's scratch)
 * A row tile takes a chunk's second half of 32 keys only where one of its rows sees one of them (diagonal chunks).
 * Probabilities are exp2(s * scale * log2 e - m) (one fused multiply-subtract). The running max m only moves when a
 * chunk's max exceeds it by more than LAZY (log2 units): between moves P stays below 2^LAZY, and O and the
 * denominator l need no rescaling (the final O / l is exact whichever m was used).
 * Numerics: q, K, V and P rounded to bf16 (nearest even), products summed in float32.
 * Needs AMX-BF16 (TM_AMX, quant.h) granted by tm_prefill_attention_init(), D % 32 == 0, D <= 256, a float32 or
 * bfloat16 pool. Items run under OpenMP (dynamic, the costliest first).
 * Dispatch (tm_prefill_attention_init, once): AMX where Linux grants the tile state, else the same kernel on
 * AVX512-BF16's vdpbf16ps (attention_prefill_bf16.c: the same items, layouts and softmax, attention_prefill.h),
 * else none (tm_prefill_attention_supported 0: the callers keep their fallback). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "attention_prefill.h"

#if defined(TM_AMX)
#include "amx.h"

/* per-thread scratch (64-byte aligned pieces) */
typedef struct {
    uint32_t *qp;   /* [row tiles][D / 32][16 pairs][16 lanes]: the B tiles of Q^T */
    float *ot;      /* [row tiles][D][16]: O^T */
    float *m, *l;   /* [row tiles][16] */
    float *st;      /* [2][KC keys][16 lanes]: S^T of a row tile and chunk (two: software pipelining) */
    uint32_t *pt;   /* [2][KC / 2 key pairs][16 lanes]: P^T in pair layout */
    uint16_t *ks;   /* [KC keys][D]: K of the chunk, where its rows cannot be tile-loaded from the pool */
    uint32_t *vt;   /* [2 halves][D][16 key pairs]: V^T, the A tiles of 16 d each */
} PScratch;


/* dst [KC][D] bf16: the rows (zeros where NULL) */
static void stage_rows(const char **rows, int D, int bf16, uint16_t *dst) {
    for (int k = 0; k < KC; k++)
        for (int x = 0; x < D; x += 16)
            _mm256_storeu_si256((__m256i *)(dst + (int64_t)k * D + x), row16(rows[k], x, bf16));
}

/* all 8 tiles 16 x 64 bytes (their roles: run_item) */
static void tiles_config(void) {
    static const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 16};
    static const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    tm_amx_load_tiles(rows, colsb);
}

/* S^T [32 keys x 16 rows] = K . Q^T into st: tiles 0, 1 (keys 0-15, 16-31); K in 2, 3 and 6, 7, Q^T in 4 and 5
 * (even / odd 32 dims); two: keys 16-31 exist */
static inline void qk_tiles(const uint32_t *qp, const uint16_t *k0p, const uint16_t *k1p, int64_t kstride, int DK,
                            int two, float *st) {
    _tile_zero(0);
    _tile_zero(1);
    for (int dk = 0; dk < DK; dk += 2) {
        _tile_loadd(4, qp + dk * 256, 64);
        _tile_loadd(2, k0p + dk * 32, kstride);
        if (two) _tile_loadd(3, k1p + dk * 32, kstride);
        _tile_dpbf16ps(0, 2, 4);
        if (two) _tile_dpbf16ps(1, 3, 4);
        if (dk + 1 < DK) {
            _tile_loadd(5, qp + (dk + 1) * 256, 64);
            _tile_loadd(6, k0p + (dk + 1) * 32, kstride);
            if (two) _tile_loadd(7, k1p + (dk + 1) * 32, kstride);
            _tile_dpbf16ps(0, 6, 5);
            if (two) _tile_dpbf16ps(1, 7, 5);
        }
    }
    _tile_stored(0, st, 64);
    _tile_stored(1, st + 256, 64);
}

/* O^T [D x 16 rows] (o, float32) += V^T . P^T over nh halves of 32 keys, 64 dims at a time: O^T in tiles 0-3,
 * P^T in 4 (and 5: second half), V^T in 6, 7 (vt: the halves D x 16 words apart) */
static inline void pv_tiles(const uint32_t *pt, const uint32_t *vt, int D, int nh, float *o) {
    const uint32_t *vt2 = vt + D * 16;
    _tile_loadd(4, pt, 64);
    if (nh == 2) _tile_loadd(5, pt + 256, 64);
    for (int x0 = 0; x0 < D; x0 += 64, o += 64 * 16, vt += 64 * 16, vt2 += 64 * 16) {
        _tile_loadd(0, o, 64);
        _tile_loadd(1, o + 256, 64);
        _tile_loadd(6, vt, 64);
        _tile_dpbf16ps(0, 6, 4);
        _tile_loadd(7, vt + 256, 64);
        _tile_dpbf16ps(1, 7, 4);
        if (nh == 2) {
            _tile_loadd(6, vt2, 64);
            _tile_dpbf16ps(0, 6, 5);
            _tile_loadd(7, vt2 + 256, 64);
            _tile_dpbf16ps(1, 7, 5);
        }
        if (x0 + 64 <= D) {
            _tile_loadd(2, o + 512, 64);
            _tile_loadd(3, o + 768, 64);
            _tile_loadd(6, vt + 512, 64);
            _tile_dpbf16ps(2, 6, 4);
            _tile_loadd(7, vt + 768, 64);
            _tile_dpbf16ps(3, 7, 4);
            if (nh == 2) {
                _tile_loadd(6, vt2 + 512, 64);
                _tile_dpbf16ps(2, 6, 5);
                _tile_loadd(7, vt2 + 768, 64);
                _tile_dpbf16ps(3, 7, 5);
            }
            _tile_stored(2, o + 512, 64);
            _tile_stored(3, o + 768, 64);
        }
        _tile_stored(0, o, 64);
        _tile_stored(1, o + 256, 64);
    }
}

static void run_item(const PArgs *a, const PItem *it, PScratch *sc) {
    const int D = a->d, DK = D / 32;
    const int n = a->qsl[it->req + 1] - a->qsl[it->req], L = a->seq_lens[it->req];
    const int64_t t0 = a->qsl[it->req] + it->q0;
    const int pos0 = L - n + it->q0, nq = it->nq, qt = (nq + 15) / 16, RT = a->h / a->hkv * qt;
    const int32_t *table = a->bt + (int64_t)it->req * a->bt_stride;
    const int bf16 = a->kv_dtype == 1, direct = bf16 && a->bs % 16 == 0;

    pack_q(a, it, t0, qt, RT, sc->qp);
    for (int i = 0; i < RT * 16; i++) { sc->m[i] = -INFINITY; sc->l[i] = 0.f; }
    memset(sc->ot, 0, sizeof(float) * (size_t)RT * D * 16);

    const int k1 = pos0 + nq; /* keys of the item: [k0, k1) */
    const int k0 = a->window > 0 && pos0 - a->window + 1 > 0 ? pos0 - a->window + 1 : 0;
    for (int c0 = k0 / KC * KC; c0 < k1; c0 += KC) {
        const char *krows[KC], *vrows[KC];
        chunk_rows(a, table, it->kvh, 0, c0, k1, krows);
        chunk_rows(a, table, it->kvh, 1, c0, k1, vrows);
        transpose_v(vrows, D, bf16, sc->vt);
        if (c0 + KH < k1) transpose_v(vrows + KH, D, bf16, sc->vt + D * 16);
        /* K's A tiles: 16 rows of one block straight from a bf16 pool (rows past k1 only give masked scores), else
         * the chunk staged as bf16 [KC][D] */
        const uint16_t *kp[4];
        int64_t kstride = D * 2;
        if (direct) {
            for (int i = 0; i < 4; i++) kp[i] = (const uint16_t *)krows[16 * i];
            kstride = (int64_t)a->hkv * D * 2;
        } else {
            stage_rows(krows, D, bf16, sc->ks);
            for (int i = 0; i < 4; i++) kp[i] = sc->ks + 16 * i * D;
        }
        /* software-pipelined over the row tiles: tile rt's S^T on the tile unit is issued before the softmax of the
         * tile before it (vector unit), so the two may overlap; st and pt double-buffered */
        int prev = -1, pbuf = 0, buf = 0, pfull = 0, pnh = 1;
        __m512i ppos = _mm512_setzero_si512();
        for (int rt = 0; rt <= RT; rt++) {
            int cur = -1, full = 0, nh = 1;
            __m512i pos = ppos;
            if (rt < RT) {
                const int j0 = (rt % qt) * 16, jl = j0 + 15 < nq - 1 ? j0 + 15 : nq - 1;
                const int pmin = pos0 + j0, pmax = pos0 + jl;
                /* skip: every key after every row, or out of every row's window; the second half only where some
                 * row sees one of its keys */
                if (c0 <= pmax && !(a->window > 0 && c0 + KC - 1 <= pmin - a->window)) {
                    nh = c0 + KH <= pmax ? 2 : 1;
                    full = c0 + KH * nh - 1 <= pmin && (a->window <= 0 || c0 > pmax - a->window);
                    pos = row_positions(pmin, pmax);
                    const uint32_t *qp = sc->qp + (int64_t)rt * DK * 256;
                    float *st = sc->st + buf * KC * 16;
                    qk_tiles(qp, kp[0], kp[1], kstride, DK, c0 + 16 < k1, st);
                    if (nh == 2) qk_tiles(qp, kp[2], kp[3], kstride, DK, c0 + 48 < k1, st + KH * 16);
                    cur = rt;
                }
            }
            if (prev >= 0 && (cur >= 0 || rt == RT)) { /* a skipped tile leaves the pending one pending */
                uint32_t *pt = sc->pt + pbuf * (KC / 2) * 16;
                softmax_tile(a, sc->m + prev * 16, sc->l + prev * 16, sc->ot + (int64_t)prev * D * 16, c0, KH * pnh,
                             ppos, pfull, sc->st + pbuf * KC * 16, pt);
                pv_tiles(pt, sc->vt, D, pnh, sc->ot + (int64_t)prev * D * 16);
                prev = -1;
            }
            if (cur >= 0) {
                prev = cur; pbuf = buf; buf ^= 1; pfull = full; ppos = pos; pnh = nh;
            }
        }
    }
    write_out(a, it, t0, qt, RT, sc->ot, sc->l);
}

/* the items under OpenMP, per-thread scratch and tile configuration */
static int prefill_amx(const PArgs *a, const PItem *items, int64_t ni) {
    const int d = a->d, RT = a->h / a->hkv * ((TQ + 15) / 16);
    int err = PF_OK;
#pragma omp parallel
    {
        /* qp, ot, m, l, st, pt, ks, vt (bytes, each a multiple of 64) */
        const size_t sz[8] = {(size_t)RT * d * 32, (size_t)RT * d * 64, (size_t)RT * 64, (size_t)RT * 64,
                              2 * KC * 64, 2 * (KC / 2) * 64, (size_t)KC * d * 2, (size_t)d * 128};
        size_t total = 0;
        for (int i = 0; i < 8; i++) total += sz[i];
        char *mem = aligned_alloc(64, total);
        if (!mem) {
#pragma omp atomic write
            err = PF_NOMEM;
        } else {
            void *p[8];
            for (int i = 0, off = 0; i < 8; off += (int)sz[i], i++) p[i] = mem + off;
            PScratch sc = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
            tiles_config();
#pragma omp for schedule(dynamic, 1)
            for (int64_t w = 0; w < ni; w++) run_item(a, &items[w], &sc);
            _tile_release();
            free(mem);
        }
    }
    return err;
}
#endif /* TM_AMX */

enum { PATH_NONE = 0, PATH_AMX = 1, PATH_BF16 = 2 };
static int prefill_path = PATH_NONE; /* set by tm_prefill_attention_init (process-wide capability, not configuration) */

int tm_prefill_attention_init(void) {
#if defined(TM_AMX)
    if (prefill_path != PATH_AMX && tm_amx_request_tiles()) prefill_path = PATH_AMX;
#endif
#if defined(TM_PREFILL_SIMD)
    if (prefill_path == PATH_NONE) prefill_path = PATH_BF16;
#endif
    return prefill_path;
}

int tm_prefill_attention_path(void) { return prefill_path; }

int tm_prefill_attention_supported(int kv_dtype, int d) {
    return prefill_path != PATH_NONE && (kv_dtype == 0 || kv_dtype == 1) && d % 32 == 0 && d > 0 && d <= 256;
}

int tm_prefill_attention(const float *q, int64_t q_st, int64_t q_sh,
                         const void *kv, int kv_dtype, int64_t num_blocks, int block_size, int hkv, int d,
                         const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                         const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                         int h, float scale, int window, float *out) {
    if (!tm_prefill_attention_supported(kv_dtype, d)) return kv_dtype == 0 || kv_dtype == 1 ? PF_UNAVAILABLE : PF_DTYPE;
#if defined(TM_PREFILL_SIMD)
    PItem *items;
    int64_t ni;
    int err = prefill_items(num_blocks, block_size, hkv, block_tables, bt_stride, bt_cols, seq_lens, qsl, num_reqs, h,
                            window, &items, &ni);
    if (err || ni == 0) return err;
    const PArgs a = {q, q_st, q_sh, (const char *)kv, kv_dtype, num_blocks, block_size, hkv, d, block_tables,
                     bt_stride, seq_lens, qsl, h, scale, window, out};
#if defined(TM_AMX)
    if (prefill_path == PATH_AMX) err = prefill_amx(&a, items, ni);
    else
#endif
    err = tm_prefill_attention_bf16(&a, items, ni);
    free(items);
    return err;
#else  /* no kernel built: supported() is 0 */
    (void)q; (void)q_st; (void)q_sh; (void)kv; (void)num_blocks; (void)block_size; (void)hkv;
    (void)block_tables; (void)bt_stride; (void)bt_cols; (void)seq_lens; (void)qsl; (void)num_reqs; (void)h;
    (void)scale; (void)window; (void)out;
    return PF_UNAVAILABLE;
#endif
}
