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
 * bfloat16 pool. Items run under OpenMP (dynamic, the costliest first). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "kernels.h"
#include "quant.h"

enum { PF_OK = 0, PF_NOMEM = -1, PF_BLOCK = -2, PF_DTYPE = -3, PF_SHAPE = -4, PF_UNAVAILABLE = -5 };

#if defined(TM_AMX)
#include "amx.h"

#define TQ 32        /* query tokens per item (2 row tiles a head) */
#define KC 64        /* keys per chunk: two halves of 32 (2 key tiles of 16 each) */
#define KH 32
#define LAZY 8.0f    /* the running max moves when a chunk's max is more than this above it */
#define DMAX 256

static int amx_granted = 0;  /* set by tm_prefill_attention_init (process-wide capability, not configuration) */

int tm_prefill_attention_init(void) {
    if (!amx_granted) amx_granted = tm_amx_request_tiles();
    return amx_granted;
}

int tm_prefill_attention_supported(int kv_dtype, int d) {
    return amx_granted && (kv_dtype == 0 || kv_dtype == 1) && d % 32 == 0 && d > 0 && d <= DMAX;
}

typedef struct {
    const float *q; int64_t q_st, q_sh;
    const char *kv; int kv_dtype; int64_t num_blocks; int bs, hkv, d;
    const int32_t *bt; int64_t bt_stride;
    const int32_t *seq_lens, *qsl;
    int h; float scale; int window;
    float *out;
} PArgs;

typedef struct { int req, kvh, q0, nq; int64_t cost; } PItem;

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

/* 2^x = p(x - floor x) * 2^floor(x) (vreduceps, vscalefps); p of degree 4 on [0, 1): |rel err| < 3e-6, far
 * below bf16's 2^-9. x = -inf gives NaN (callers zero those lanes); x <= -127 may give denormals or 0. */
static inline __m512 exp2_16(__m512 x) {
    const __m512 r = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(1.3520603197e-2f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.2037428774e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4142749325e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9300662066e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000025181f));
    return _mm512_scalef_ps(p, x);
}

/* the pool rows (K: plane 0, V: plane 1) of keys c0 .. c0 + KC - 1 of one KV head; NULL at positions >= k1 */
static void chunk_rows(const PArgs *a, const int32_t *table, int kvh, int plane, int c0, int k1, const char **rows) {
    const int BS = a->bs, esize = a->kv_dtype == 1 ? 2 : 4;
    const int64_t row = (int64_t)a->hkv * a->d, plane_elems = a->num_blocks * BS * row;
    const char *base = a->kv + (plane * plane_elems + (int64_t)kvh * a->d) * esize;
    int b = c0 / BS, o = c0 - b * BS; /* block index and offset of position c0 + k (no division per key) */
    for (int k = 0; k < KC; k++) {
        rows[k] = c0 + k >= k1 ? NULL : base + ((int64_t)table[b] * BS + o) * row * esize;
        if (++o == BS) { o = 0; b++; }
    }
}

/* 16 elements of a pool row (float32 or bfloat16; NULL: zeros) as bf16 */
static inline __m256i row16(const char *r, int x, int bf16) {
    if (!r) return _mm256_setzero_si256();
    if (bf16) return _mm256_loadu_si256((const __m256i *)(r + 2 * x));
    return (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps((const float *)r + x));
}

/* dst [KC][D] bf16: the rows (zeros where NULL) */
static void stage_rows(const char **rows, int D, int bf16, uint16_t *dst) {
    for (int k = 0; k < KC; k++)
        for (int x = 0; x < D; x += 16)
            _mm256_storeu_si256((__m256i *)(dst + (int64_t)k * D + x), row16(rows[k], x, bf16));
}

/* vt [D][16 key pairs] = V^T of 32 rows: word p of row x holds keys 2p, 2p + 1 of dim x (the A tile layout) */
static void transpose_v(const char **rows, int D, int bf16, uint32_t *vt) {
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int x0 = 0; x0 < D; x0 += 16) {
        __m512i r[16];
        for (int p = 0; p < 16; p++) { /* key pair p: its two rows' dims x0 .. x0 + 15 interleaved */
            const __m512i two = _mm512_inserti64x4(_mm512_castsi256_si512(row16(rows[2 * p], x0, bf16)),
                                                   row16(rows[2 * p + 1], x0, bf16), 1);
            r[p] = _mm512_permutexvar_epi16(inter, two);
        }
        tm_transpose16(r);
        for (int x = 0; x < 16; x++) _mm512_store_si512((void *)(vt + (int64_t)(x0 + x) * 16), r[x]);
    }
}

/* Online-softmax update of row tile rt from its S^T in st (nk keys from c0): P^T (pair layout, nk / 2 pairs) into
 * pt; l and O^T rescaled when the running max moves. pos: the 16 rows' positions; full: no key is masked for any
 * row (else masked scores become -inf and their probabilities 0). */
static void softmax_tile(const PArgs *a, PScratch *sc, int rt, int c0, int nk, __m512i pos, int full, float *st,
                         uint32_t *pt) {
    const int D = a->d;
    const __m512 c = _mm512_set1_ps(a->scale * 1.44269504088896341f); /* scores to log2 units */
    float *mp = sc->m + rt * 16, *lp = sc->l + rt * 16;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 cmax = ninf;
    if (full) {
        for (int k = 0; k < nk; k++) cmax = _mm512_max_ps(cmax, _mm512_load_ps(st + k * 16));
    } else {
        const __m512i lo = _mm512_sub_epi32(pos, _mm512_set1_epi32(a->window)); /* keys must be > lo (window) */
        for (int k = 0; k < nk; k++) {
            const __m512i kp = _mm512_set1_epi32(c0 + k);
            __mmask16 ok = _mm512_cmple_epi32_mask(kp, pos);
            if (a->window > 0) ok &= _mm512_cmpgt_epi32_mask(kp, lo);
            const __m512 s = _mm512_mask_mov_ps(ninf, ok, _mm512_load_ps(st + k * 16));
            _mm512_store_ps(st + k * 16, s);
            cmax = _mm512_max_ps(cmax, s);
        }
    }
    cmax = _mm512_mul_ps(cmax, c);
    __m512 m = _mm512_load_ps(mp);
    const __mmask16 move = _mm512_cmp_ps_mask(cmax, _mm512_add_ps(m, _mm512_set1_ps(LAZY)), _CMP_GT_OQ);
    if (move) {
        const __m512 mnew = _mm512_mask_mov_ps(m, move, cmax);
        /* rows moving from -inf: alpha 0 (their l and O are still 0) */
        const __m512 alpha = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), move,
                                                _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, ninf, _CMP_NEQ_OQ),
                                                                    exp2_16(_mm512_sub_ps(m, mnew))));
        _mm512_store_ps(lp, _mm512_mul_ps(_mm512_load_ps(lp), alpha));
        float *o = sc->ot + (int64_t)rt * D * 16;
        for (int x = 0; x < D; x++) _mm512_store_ps(o + x * 16, _mm512_mul_ps(_mm512_load_ps(o + x * 16), alpha));
        _mm512_store_ps(mp, mnew);
        m = mnew;
    }
    /* rows that have seen no key yet (m = -inf) see none in this chunk either: subtract 0, zero their lanes */
    const __m512 mu = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(m, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 sum = _mm512_setzero_ps();
    for (int p = 0; p < nk / 2; p++) {
        const __m512 s0 = _mm512_load_ps(st + 2 * p * 16), s1 = _mm512_load_ps(st + (2 * p + 1) * 16);
        __m512 p0 = exp2_16(_mm512_fmsub_ps(s0, c, mu)), p1 = exp2_16(_mm512_fmsub_ps(s1, c, mu));
        if (!full) {
            p0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s0, ninf, _CMP_NEQ_OQ), p0);
            p1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s1, ninf, _CMP_NEQ_OQ), p1);
        }
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        /* words of lanes 0..15: (p0, p1) of each row, as bf16 pairs */
        _mm512_store_si512((void *)(pt + p * 16),
                           _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
    }
    _mm512_store_ps(lp, _mm512_add_ps(_mm512_load_ps(lp), sum));
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
    const int G = a->h / a->hkv, D = a->d, DK = D / 32;
    const int n = a->qsl[it->req + 1] - a->qsl[it->req], L = a->seq_lens[it->req];
    const int64_t t0 = a->qsl[it->req] + it->q0;
    const int pos0 = L - n + it->q0, nq = it->nq, qt = (nq + 15) / 16, RT = G * qt;
    const int32_t *table = a->bt + (int64_t)it->req * a->bt_stride;
    const int bf16 = a->kv_dtype == 1, direct = bf16 && a->bs % 16 == 0;

    /* Q^T tiles: word (dk, p, lane) = q[row lane][32 dk + 2p .. + 1] as a bf16 pair; padding rows zero */
    for (int rt = 0; rt < RT; rt++) {
        const int g = rt / qt, j0 = (rt % qt) * 16;
        for (int dk = 0; dk < DK; dk++) {
            __m512i r[16];
            for (int lane = 0; lane < 16; lane++) {
                const float *src = a->q + (t0 + j0 + lane) * a->q_st + (int64_t)(it->kvh * G + g) * a->q_sh + 32 * dk;
                r[lane] = j0 + lane < nq ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src))
                                         : _mm512_setzero_si512();
            }
            tm_transpose16(r);
            uint32_t *B = sc->qp + ((int64_t)rt * DK + dk) * 256;
            for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(B + p * 16), r[p]);
        }
    }
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
                    pos = _mm512_min_epi32(_mm512_add_epi32(_mm512_set1_epi32(pmin),
                                                            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                                             3, 2, 1, 0)),
                                           _mm512_set1_epi32(pmax));
                    const uint32_t *qp = sc->qp + (int64_t)rt * DK * 256;
                    float *st = sc->st + buf * KC * 16;
                    qk_tiles(qp, kp[0], kp[1], kstride, DK, c0 + 16 < k1, st);
                    if (nh == 2) qk_tiles(qp, kp[2], kp[3], kstride, DK, c0 + 48 < k1, st + KH * 16);
                    cur = rt;
                }
            }
            if (prev >= 0 && (cur >= 0 || rt == RT)) { /* a skipped tile leaves the pending one pending */
                uint32_t *pt = sc->pt + pbuf * (KC / 2) * 16;
                softmax_tile(a, sc, prev, c0, KH * pnh, ppos, pfull, sc->st + pbuf * KC * 16, pt);
                pv_tiles(pt, sc->vt, D, pnh, sc->ot + (int64_t)prev * D * 16);
                prev = -1;
            }
            if (cur >= 0) {
                prev = cur; pbuf = buf; buf ^= 1; pfull = full; ppos = pos; pnh = nh;
            }
        }
    }
    for (int rt = 0; rt < RT; rt++) { /* out rows = O^T transposed, 16 dims at a time, over l */
        const int g = rt / qt, j0 = (rt % qt) * 16, nl = nq - j0 < 16 ? nq - j0 : 16;
        const float *o = sc->ot + (int64_t)rt * D * 16;
        float inv[16];
        _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_load_ps(sc->l + rt * 16)));
        for (int x0 = 0; x0 < D; x0 += 16) {
            __m512i r[16];
            for (int x = 0; x < 16; x++) r[x] = _mm512_load_si512((const void *)(o + (x0 + x) * 16));
            tm_transpose16(r);
            for (int lane = 0; lane < nl; lane++)
                _mm512_storeu_ps(a->out + ((t0 + j0 + lane) * a->h + it->kvh * G + g) * (int64_t)D + x0,
                                 _mm512_mul_ps((__m512)r[lane], _mm512_set1_ps(inv[lane])));
        }
    }
}

static int by_cost(const void *x, const void *y) {
    const int64_t a = ((const PItem *)x)->cost, b = ((const PItem *)y)->cost;
    return a < b ? 1 : (a > b ? -1 : 0);
}

int tm_prefill_attention(const float *q, int64_t q_st, int64_t q_sh,
                         const void *kv, int kv_dtype, int64_t num_blocks, int block_size, int hkv, int d,
                         const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                         const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                         int h, float scale, int window, float *out) {
    if (!tm_prefill_attention_supported(kv_dtype, d)) return kv_dtype == 0 || kv_dtype == 1 ? PF_UNAVAILABLE : PF_DTYPE;
    if (hkv <= 0 || h % hkv || block_size <= 0 || num_reqs < 0 || window < 0) return PF_SHAPE;
    int64_t ni = 0;
    for (int i = 0; i < num_reqs; i++) {
        const int n = qsl[i + 1] - qsl[i], L = seq_lens[i];
        if (n < 0 || L < n) return PF_SHAPE;
        const int64_t nblk = ((int64_t)L + block_size - 1) / block_size;
        if (nblk > bt_cols) return PF_SHAPE;
        for (int64_t b = 0; b < nblk; b++) {
            const int32_t id = block_tables[i * bt_stride + b];
            if (id < 0 || id >= num_blocks) return PF_BLOCK;
        }
        ni += (int64_t)hkv * ((n + TQ - 1) / TQ);
    }
    if (ni == 0) return PF_OK;
    PItem *items = malloc(sizeof(PItem) * ni);
    if (!items) return PF_NOMEM;
    ni = 0;
    for (int i = 0; i < num_reqs; i++) {
        const int n = qsl[i + 1] - qsl[i], L = seq_lens[i];
        for (int q0 = 0; q0 < n; q0 += TQ) {
            const int nq = n - q0 < TQ ? n - q0 : TQ, p0 = L - n + q0;
            const int k0 = window > 0 && p0 - window + 1 > 0 ? p0 - window + 1 : 0;
            for (int kvh = 0; kvh < hkv; kvh++) items[ni++] = (PItem){i, kvh, q0, nq, (int64_t)nq * (p0 + nq - k0)};
        }
    }
    qsort(items, ni, sizeof(PItem), by_cost);
    const PArgs a = {q, q_st, q_sh, (const char *)kv, kv_dtype, num_blocks, block_size, hkv, d, block_tables,
                     bt_stride, seq_lens, qsl, h, scale, window, out};
    const int G = h / hkv, RT = G * ((TQ + 15) / 16);
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
            for (int64_t w = 0; w < ni; w++) run_item(&a, &items[w], &sc);
            _tile_release();
            free(mem);
        }
    }
    free(items);
    return err;
}

#else  /* built without the AMX path */
int tm_prefill_attention_init(void) { return 0; }
int tm_prefill_attention_supported(int kv_dtype, int d) { (void)kv_dtype; (void)d; return 0; }
int tm_prefill_attention(const float *q, int64_t q_st, int64_t q_sh,
                         const void *kv, int kv_dtype, int64_t num_blocks, int block_size, int hkv, int d,
                         const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                         const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                         int h, float scale, int window, float *out) {
    (void)q; (void)q_st; (void)q_sh; (void)kv; (void)kv_dtype; (void)num_blocks; (void)block_size; (void)hkv; (void)d;
    (void)block_tables; (void)bt_stride; (void)bt_cols; (void)seq_lens; (void)qsl; (void)num_reqs; (void)h;
    (void)scale; (void)window; (void)out;
    return PF_UNAVAILABLE;
}
#endif
