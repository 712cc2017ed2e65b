/* The parts of the prefill attention kernels that do not depend on how the products are computed: the AMX tile
 * kernel (attention_prefill.c) and the AVX512-BF16 vdpbf16ps kernel (attention_prefill_bf16.c) share the work
 * items, the paged K/V reads, the bf16 pair layouts, the lane-wise online softmax and the output. Include under
 * TM_PREFILL_SIMD (below): everything here needs AVX-512 F/BW and AVX512-BF16.
 *
 * Layouts (32-bit words hold bf16 pairs, the low half the even element):
 *   Q^T of a row tile (16 query rows of one head): [D / 2 pairs][16 lanes], word (p, lane) = q[lane][2p, 2p + 1]
 *     (the AMX B tiles of 32 dims are consecutive 16-pair slices of it);
 *   V^T of 32 keys: [D][16 key pairs], word (x, p) = V[2p][x], V[2p + 1][x];
 *   P^T of 32 keys: [16 key pairs][16 lanes], word (p, lane) = P[lane][2p, 2p + 1];
 *   S^T: [keys][16 lanes] float32; O^T: [D][16 lanes] float32. */
#ifndef TM_ATTENTION_PREFILL_H
#define TM_ATTENTION_PREFILL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "kernels.h"
#include "quant.h"

enum { PF_OK = 0, PF_NOMEM = -1, PF_BLOCK = -2, PF_DTYPE = -3, PF_SHAPE = -4, PF_UNAVAILABLE = -5 };

#if defined(TM_AVX512) && defined(__AVX512BF16__)
#define TM_PREFILL_SIMD 1
#include "simd.h" /* tm_transpose16 */

#define TQ 32        /* query tokens per item (2 row tiles a head) */
#define KC 64        /* keys per chunk: two halves of 32 */
#define KH 32
#define LAZY 8.0f    /* the running max moves when a chunk's max is more than this above it */
#define DMAX 256

typedef struct {
    const float *q; int64_t q_st, q_sh;
    const char *kv; int kv_dtype; int64_t num_blocks; int bs, hkv, d;
    const int32_t *bt; int64_t bt_stride;
    const int32_t *seq_lens, *qsl;
    int h; float scale; int window;
    float *out;
} PArgs;

typedef struct { int req, kvh, q0, nq; int64_t cost; } PItem;

/* the AVX512-BF16 kernel (attention_prefill_bf16.c): tm_prefill_attention's work on the items it is given */
int tm_prefill_attention_bf16(const PArgs *a, const PItem *items, int64_t ni);

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
static inline void chunk_rows(const PArgs *a, const int32_t *table, int kvh, int plane, int c0, int k1,
                              const char **rows) {
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

/* 32 elements of a pool row from x (NULL: zeros) as 16 bf16 pairs */
static inline __m512i row32(const char *r, int x, int bf16) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(row16(r, x, bf16)), row16(r, x + 16, bf16), 1);
}

/* vt [D][16 key pairs] = V^T of 32 rows: word p of row x holds keys 2p, 2p + 1 of dim x (the A tile layout) */
static inline void transpose_v(const char **rows, int D, int bf16, uint32_t *vt) {
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

/* Online-softmax update of one row tile from its S^T in st (nk keys from c0): P^T (pair layout, nk / 2 pairs) into
 * pt; its running max mp, denominator lp [16] and O^T o [D][16] rescaled when the running max moves. pos: the 16
 * rows' positions; full: no key is masked for any row (else masked scores become -inf and their probabilities 0). */
static inline void softmax_tile(const PArgs *a, float *mp, float *lp, float *o, int c0, int nk, __m512i pos, int full,
                         float *st, uint32_t *pt) {
    const int D = a->d;
    const __m512 c = _mm512_set1_ps(a->scale * 1.44269504088896341f); /* scores to log2 units */
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

/* Q^T of the item's RT = G x qt row tiles into qp ([RT][D / 2][16] words: row tile rt = head g = rt / qt, tokens
 * 16 (rt % qt) ..; padding rows zero) */
static inline void pack_q(const PArgs *a, const PItem *it, int64_t t0, int qt, int RT, uint32_t *qp) {
    const int G = a->h / a->hkv, DK = a->d / 32, nq = it->nq;
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
            uint32_t *B = qp + ((int64_t)rt * DK + dk) * 256;
            for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(B + p * 16), r[p]);
        }
    }
}

/* the rows 16 positions from pmin (capped at pmax: padding rows repeat the last) */
static inline __m512i row_positions(int pmin, int pmax) {
    return _mm512_min_epi32(_mm512_add_epi32(_mm512_set1_epi32(pmin),
                                             _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)),
                            _mm512_set1_epi32(pmax));
}

/* out rows of the item = its O^T ([RT][D][16]) transposed, 16 dims at a time, over l ([RT][16]) */
static inline void write_out(const PArgs *a, const PItem *it, int64_t t0, int qt, int RT, const float *ot,
                             const float *l) {
    const int G = a->h / a->hkv, D = a->d, nq = it->nq;
    for (int rt = 0; rt < RT; rt++) {
        const int g = rt / qt, j0 = (rt % qt) * 16, nl = nq - j0 < 16 ? nq - j0 : 16;
        const float *o = ot + (int64_t)rt * D * 16;
        float inv[16];
        _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_load_ps(l + rt * 16)));
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

static inline int by_cost(const void *x, const void *y) {
    const int64_t a = ((const PItem *)x)->cost, b = ((const PItem *)y)->cost;
    return a < b ? 1 : (a > b ? -1 : 0);
}

/* The arguments checked (PF_SHAPE / PF_BLOCK) and the work items listed, costliest first: (request, KV head, up to
 * TQ query tokens). *items: malloc'ed (NULL when there are none); *ni: their number. */
static inline int prefill_items(int64_t num_blocks, int block_size, int hkv, const int32_t *block_tables,
                                int64_t bt_stride, int64_t bt_cols, const int32_t *seq_lens, const int32_t *qsl,
                                int num_reqs, int h, int window, PItem **items, int64_t *ni) {
    *items = NULL;
    *ni = 0;
    if (hkv <= 0 || h % hkv || block_size <= 0 || num_reqs < 0 || window < 0) return PF_SHAPE;
    int64_t n_items = 0;
    for (int i = 0; i < num_reqs; i++) {
        const int n = qsl[i + 1] - qsl[i], L = seq_lens[i];
        if (n < 0 || L < n) return PF_SHAPE;
        const int64_t nblk = ((int64_t)L + block_size - 1) / block_size;
        if (nblk > bt_cols) return PF_SHAPE;
        for (int64_t b = 0; b < nblk; b++) {
            const int32_t id = block_tables[i * bt_stride + b];
            if (id < 0 || id >= num_blocks) return PF_BLOCK;
        }
        n_items += (int64_t)hkv * ((n + TQ - 1) / TQ);
    }
    if (n_items == 0) return PF_OK;
    PItem *it = malloc(sizeof(PItem) * n_items);
    if (!it) return PF_NOMEM;
    int64_t k = 0;
    for (int i = 0; i < num_reqs; i++) {
        const int n = qsl[i + 1] - qsl[i], L = seq_lens[i];
        for (int q0 = 0; q0 < n; q0 += TQ) {
            const int nq = n - q0 < TQ ? n - q0 : TQ, p0 = L - n + q0;
            const int k0 = window > 0 && p0 - window + 1 > 0 ? p0 - window + 1 : 0;
            for (int kvh = 0; kvh < hkv; kvh++) it[k++] = (PItem){i, kvh, q0, nq, (int64_t)nq * (p0 + nq - k0)};
        }
    }
    qsort(it, n_items, sizeof(PItem), by_cost);
    *items = it;
    *ni = n_items;
    return PF_OK;
}

#endif /* TM_AVX512 && __AVX512BF16__ */
#endif /* TM_ATTENTION_PREFILL_H */
