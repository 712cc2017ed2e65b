/* Prefill attention on AVX512-BF16's vdpbf16ps, for CPUs without AMX (Zen 4): the AMX kernel of
 * attention_prefill.c (same items, key chunks, masks, lazy online softmax and numerics: q, K, V and P rounded to
 * bf16, products summed in float32), its tile products done with vector dot products of bf16 pairs. Called by
 * tm_prefill_attention when tm_prefill_attention_init found no AMX tile state.
 *
 * Per item (request, KV head, up to TQ query tokens) and chunk of KC = 64 keys, every row tile (16 query rows of
 * one head, one per lane) computes, transposed:
 *   S^T [16 keys x 16 rows] per 16-key group: 16 accumulators (one per key); per bf16 pair p of the head dim, one
 *     vector of Q^T (pair p of the 16 rows, packed once per item) times each key's pair p broadcast. The chunk's K
 *     is transposed once into K^T words [D / 2 pairs][KC keys], so a pair's 16 broadcasts are one pointer with
 *     constant offsets.
 *   the lane-wise online softmax of attention_prefill.h (P^T in pair layout);
 *   O^T [D x 16 rows] += V^T P^T, 16 dims at a time: 16 accumulators (loaded from and stored to the item's O^T),
 *     per key pair one vector of P^T times each dim's V pair broadcast (V^T [D][16 key pairs], transposed once per
 *     chunk as for the AMX tiles).
 * Either product: 16 accumulators, one vector load and 16 broadcasts from L1 per 16 vdpbf16ps (32 bf16 products
 * each). Items run under OpenMP (dynamic, the costliest first). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "attention_prefill.h"

#if defined(TM_PREFILL_SIMD)

/* per-thread scratch (64-byte aligned pieces) */
typedef struct {
    uint32_t *qp;   /* [row tiles][D / 2 pairs][16 lanes]: Q^T */
    float *ot;      /* [row tiles][D][16]: O^T */
    float *m, *l;   /* [row tiles][16] */
    float *st;      /* [KC keys][16 lanes]: S^T of a row tile and chunk */
    uint32_t *pt;   /* [KC / 2 key pairs][16 lanes]: P^T in pair layout */
    uint32_t *kt;   /* [D / 2 pairs][KC keys]: K^T words of the chunk */
    uint32_t *vt;   /* [2 halves][D][16 key pairs]: V^T */
} BScratch;

/* kt [D / 2][KC]: K^T words of key groups 0 .. ng - 1 (16 keys each; NULL rows zero) */
static void transpose_k(const char **rows, int D, int bf16, int ng, uint32_t *kt) {
    for (int g = 0; g < ng; g++)
        for (int x0 = 0; x0 < D; x0 += 32) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) r[j] = row32(rows[16 * g + j], x0, bf16);
            tm_transpose16(r); /* r[p]: pair x0 / 2 + p of the 16 keys */
            for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(kt + (int64_t)(x0 / 2 + p) * KC + 16 * g), r[p]);
        }
}

#define BCST(w) ((__m512bh)_mm512_set1_epi32((int)(w)))

/* st [16 keys][16 rows] = S^T of one key group: qp the row tile's Q^T [DP][16], kt its first key's K^T column */
static inline void qk16(const uint32_t *qp, const uint32_t *kt, int DP, float *st) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int p = 0; p < DP; p++, qp += 16, kt += KC) {
        const __m512bh qv = (__m512bh)_mm512_load_si512((const void *)qp);
        for (int j = 0; j < 16; j++) acc[j] = _mm512_dpbf16_ps(acc[j], qv, BCST(kt[j]));
    }
    for (int j = 0; j < 16; j++) _mm512_store_ps(st + j * 16, acc[j]);
}

/* O^T [D][16] (o, float32) += V^T . P^T over nkp key pairs (a multiple of 8; pt: [nkp][16]; vt: [2 halves][D][16]) */
static inline void pv16(const uint32_t *pt, const uint32_t *vt, int D, int nkp, float *o) {
    for (int x0 = 0; x0 < D; x0 += 16) {
        __m512 acc[16];
        for (int x = 0; x < 16; x++) acc[x] = _mm512_load_ps(o + (x0 + x) * 16);
        for (int k0 = 0; k0 < nkp; k0 += 8) { /* 8 key pairs of one half */
            const uint32_t *v = vt + ((int64_t)(k0 / 16) * D + x0) * 16 + k0 % 16, *pp = pt + k0 * 16;
            for (int kp = 0; kp < 8; kp++) {
                const __m512bh pv = (__m512bh)_mm512_load_si512((const void *)(pp + kp * 16));
                for (int x = 0; x < 16; x++) acc[x] = _mm512_dpbf16_ps(acc[x], pv, BCST(v[x * 16 + kp]));
            }
        }
        for (int x = 0; x < 16; x++) _mm512_store_ps(o + (x0 + x) * 16, acc[x]);
    }
}

static void run_item(const PArgs *a, const PItem *it, BScratch *sc) {
    const int D = a->d, DP = D / 2;
    const int n = a->qsl[it->req + 1] - a->qsl[it->req], L = a->seq_lens[it->req];
    const int64_t t0 = a->qsl[it->req] + it->q0;
    const int pos0 = L - n + it->q0, nq = it->nq, qt = (nq + 15) / 16, RT = a->h / a->hkv * qt;
    const int32_t *table = a->bt + (int64_t)it->req * a->bt_stride;
    const int bf16 = a->kv_dtype == 1;

    pack_q(a, it, t0, qt, RT, sc->qp);
    for (int i = 0; i < RT * 16; i++) { sc->m[i] = -INFINITY; sc->l[i] = 0.f; }
    memset(sc->ot, 0, sizeof(float) * (size_t)RT * D * 16);

    const int k1 = pos0 + nq; /* keys of the item: [k0, k1) */
    const int k0 = a->window > 0 && pos0 - a->window + 1 > 0 ? pos0 - a->window + 1 : 0;
    for (int c0 = k0 / KC * KC; c0 < k1; c0 += KC) {
        const char *krows[KC], *vrows[KC];
        chunk_rows(a, table, it->kvh, 0, c0, k1, krows);
        chunk_rows(a, table, it->kvh, 1, c0, k1, vrows);
        /* key groups of 16 that exist (ng): a row tile reads those up to its last row's position */
        const int ng = k1 - c0 >= KC ? KC / 16 : (k1 - c0 + 15) / 16;
        transpose_k(krows, D, bf16, ng, sc->kt);
        transpose_v(vrows, D, bf16, sc->vt);
        if (c0 + KH < k1) transpose_v(vrows + KH, D, bf16, sc->vt + D * 16);
        for (int rt = 0; rt < RT; rt++) {
            const int j0 = (rt % qt) * 16, jl = j0 + 15 < nq - 1 ? j0 + 15 : nq - 1;
            const int pmin = pos0 + j0, pmax = pos0 + jl;
            /* skip: every key after every row, or out of every row's window; key groups of 16 only up to the last
             * one some row sees */
            if (c0 > pmax || (a->window > 0 && c0 + KC - 1 <= pmin - a->window)) continue;
            const int ngr = (pmax - c0) / 16 + 1 < ng ? (pmax - c0) / 16 + 1 : ng, nk = 16 * ngr;
            const int full = c0 + nk - 1 <= pmin && (a->window <= 0 || c0 > pmax - a->window);
            const uint32_t *qp = sc->qp + (int64_t)rt * DP * 16;
            for (int g = 0; g < ngr; g++) qk16(qp, sc->kt + 16 * g, DP, sc->st + g * 256);
            float *o = sc->ot + (int64_t)rt * D * 16;
            softmax_tile(a, sc->m + rt * 16, sc->l + rt * 16, o, c0, nk, row_positions(pmin, pmax), full, sc->st,
                         sc->pt);
            pv16(sc->pt, sc->vt, D, nk / 2, o);
        }
    }
    write_out(a, it, t0, qt, RT, sc->ot, sc->l);
}

int tm_prefill_attention_bf16(const PArgs *a, const PItem *items, int64_t ni) {
    const int d = a->d, RT = a->h / a->hkv * ((TQ + 15) / 16);
    int err = PF_OK;
#pragma omp parallel
    {
        /* qp, ot, m, l, st, pt, kt, vt (bytes, each a multiple of 64) */
        const size_t sz[8] = {(size_t)RT * d * 32, (size_t)RT * d * 64, (size_t)RT * 64, (size_t)RT * 64,
                              KC * 64, (KC / 2) * 64, (size_t)d * KC * 2, (size_t)d * 128};
        size_t total = 0;
        for (int i = 0; i < 8; i++) total += sz[i];
        char *mem = aligned_alloc(64, total);
        if (!mem) {
#pragma omp atomic write
            err = PF_NOMEM;
        } else {
            void *p[8];
            for (int i = 0, off = 0; i < 8; off += (int)sz[i], i++) p[i] = mem + off;
            BScratch sc = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
#pragma omp for schedule(dynamic, 1)
            for (int64_t w = 0; w < ni; w++) run_item(a, &items[w], &sc);
            free(mem);
        }
    }
    return err;
}

#endif /* TM_PREFILL_SIMD */
