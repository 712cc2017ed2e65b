// y[M,N] = xr[M,K] @ W[N,K]^T for the k-quants (Q4_K, Q5_K, Q6_K) on Intel AMX's int8 tiles, W kept packed, x
// rounded per 32 values to int8 (xr = xsc * xq, tm_prepare_x_i8): the int8 direct tiles' arithmetic (qlinear_k.c
// gen_tile_i8) for any number of rows, exactly the dequantized weights times xr up to float summation order.
// Compiled where the compiler targets AMX-INT8 besides the AMX path's features (TM_AMX_I8, quant.h).
//
// Each weight is w = d_j * q + m_g: q a small integer (Q4_K 0..15, Q5_K 0..31, Q6_K -32..31) and d_j the scale of
// its group j of G weights (G = 32, Q6_K 16), m_g the min of its sub-block g of 32 (Q4_K, Q5_K; 0 for Q6_K). So
//   y[r, n] = sum_j d_j[n] * xsc[r, g(j)] * sum_{k in j} q[n, k] xq[r, k]  +  sum_g m_g[n] * xs[r, g]
// with xs[r, g] = xsc[r, g] * sum_{k in g} xq[r, k]. The tile unit computes the integer sums of one group for 16
// outputs x 16 rows at once (TDPBSSD: C[16 n x 16 r] += A[16 n x G bytes] . B[G/4 quads x 16 r x 4]): A is the
// group's weight integers, 16 packed rows decoded into a buffer once per call (no transpose: output rows are A's
// rows); B is x in quad layout (tm_prepare_x_amx_i8, once per call). Each group's C tile is stored and scaled
// into 16 float accumulators (one per output, lanes = rows) by d_j[n] * xsc[r, g]: the weights' scales never
// meet a float weight, so the cost per weight is the decode of its integer and 1/16 of a C-tile flush.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"

#if defined(TM_AMX_I8)
#include "amx.h"

// Tiles: 0-3 C (16 outputs x 16 rows, int32), 4-5 A (16 outputs x G bytes), 6-7 B (G/4 quads x 16 rows x 4).
static void amx_i8_config(int G) {
    uint8_t rows[8];
    uint16_t colsb[8];
    for (int t = 0; t < 8; t++) {
        rows[t] = t >= 6 ? (uint8_t)(G / 4) : 16;
        colsb[t] = t == 4 || t == 5 ? (uint16_t)G : 64;
    }
    tm_amx_load_tiles(rows, colsb);
}

int64_t tm_amx_i8_x_bytes(int64_t M, int64_t K) { return (M + 15) / 16 * 16 * K; }

void tm_prepare_x_amx_i8(const int8_t *xq, const float *xsc, const float *xs, int64_t M, int64_t K, int8_t *xb,
                         float *xscT, float *xsT) {
    const int64_t ng = K / QK, tiles = (M + 15) / 16;
    memset(xb, 0, (size_t)(tiles * 16 * K));
    memset(xscT, 0, (size_t)(tiles * ng * 16) * sizeof(float));
    memset(xsT, 0, (size_t)(tiles * ng * 16) * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        const int64_t t = m / 16, r = m % 16;
        for (int64_t g = 0; g < ng; g++) {
            const int8_t *src = xq + m * K + g * QK;
            int8_t *dst = xb + ((t * ng + g) * 8 * 16 + r) * 4;  // quad j of row r at dst + j * 64
            for (int j = 0; j < QK / 4; j++) memcpy(dst + j * 64, src + 4 * j, 4);
            xscT[(t * ng + g) * 16 + r] = xsc[m * ng + g];
            xsT[(t * ng + g) * 16 + r] = xs[m * ng + g];
        }
    }
}

// Output rows n0 .. n0 + nr - 1 (nr <= 16) decoded: wq[n * K + k] the integers, wd[n * (K / G) + j] the group
// scales, wm[n * (K / 32) + g] the mins; rows nr .. 15 zero.
static inline __attribute__((always_inline)) void decode_panel(const int qtype, const uint8_t *w, int64_t row_bytes,
                                                               int64_t K, int nr, int8_t *wq, float *wd, float *wm) {
    const int bb = block_bytes(qtype), G = qtype == Q6_K ? 16 : 32, nd = QK_K / G;
    const int64_t nsb = K / QK_K;
    for (int n = 0; n < nr; n++) {
        const uint8_t *row = w + n * row_bytes;
        for (int64_t b = 0; b < nsb; b++) {
            const uint8_t *blk = row + b * bb;
            for (int off = 0; off < bb; off += 64) __builtin_prefetch(blk + 4 * bb + off, 0, 3);
            float mins[QK_K / QK];
            kquant_scales(qtype, blk, wd + n * (K / G) + b * nd, mins);
            if (qtype != Q6_K) memcpy(wm + n * (K / QK) + b * (QK_K / QK), mins, sizeof mins);
            for (int s = 0; s < QK_K / QK; s++)
                _mm256_storeu_si256((__m256i *)(wq + n * K + b * QK_K + s * QK), gen_sub_q256(qtype, blk, s));
        }
    }
    if (nr < 16) {
        memset(wq + nr * K, 0, (size_t)((16 - nr) * K));
        memset(wd + nr * (K / G), 0, (size_t)((16 - nr) * (K / G)) * sizeof(float));
        memset(wm + nr * (K / QK), 0, (size_t)((16 - nr) * (K / QK)) * sizeof(float));
    }
}

// acc[n] (lanes: rows) += C tile (int32 [16 n][16 r] at cb) * wd[n, j] * xsc[g] (+ wm[n, g] * xs[g])
#define FLUSH(HAS_M, j, g)                                                                                        \
    do {                                                                                                          \
        const __m512 xsc_g = _mm512_loadu_ps(xscT + (g) * 16), xs_g = _mm512_loadu_ps(xsT + (g) * 16);           \
        _Pragma("GCC unroll 16") for (int n = 0; n < 16; n++) {                                                   \
            const __m512 c = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(cb + n * 16)));                  \
            acc[n] = _mm512_fmadd_ps(c, _mm512_mul_ps(xsc_g, _mm512_set1_ps(wd[n * nj + (j)])), acc[n]);          \
            if (HAS_M) acc[n] = _mm512_fmadd_ps(xs_g, _mm512_set1_ps(wm[n * ng + (g)]), acc[n]);                 \
        }                                                                                                         \
    } while (0)

// groups j, j + 1: C tiles c0, c1 = their integer sums
#define DP2(c0, c1, j)                                      \
    do {                                                    \
        _tile_loadd(4, wq + (j) * G, K);                    \
        _tile_loadd(6, xt + (j) * G * 16, 64);              \
        _tile_zero(c0);                                     \
        _tile_dpbssd(c0, 4, 6);                             \
        _tile_loadd(5, wq + ((j) + 1) * G, K);              \
        _tile_loadd(7, xt + ((j) + 1) * G * 16, 64);        \
        _tile_zero(c1);                                     \
        _tile_dpbssd(c1, 5, 7);                             \
    } while (0)

// C tiles c0, c1 (groups j, j + 1) into the accumulators
#define FLUSH2(c0, c1, j)                                                              \
    do {                                                                               \
        _tile_stored(c0, cb, 64);                                                      \
        if (has_m) FLUSH(1, (j), (j) * G / QK); else FLUSH(0, (j), (j) * G / QK);      \
        _tile_stored(c1, cb, 64);                                                      \
        if (has_m) FLUSH(1, (j) + 1, ((j) + 1) * G / QK); else FLUSH(0, (j) + 1, ((j) + 1) * G / QK); \
    } while (0)

// One decoded panel (16 outputs) against every 16-row tile of the prepared x: y[m, n0 + n] for n < nr.
static inline __attribute__((always_inline)) void panel_rows(const int qtype, const int8_t *wq, const float *wd,
                                                             const float *wm, const int8_t *xb, const float *xscT0,
                                                             const float *xsT0, int64_t M, int64_t K, int nr,
                                                             float *y, int64_t ldy, int32_t *cb, float *ob) {
    const int G = qtype == Q6_K ? 16 : 32, has_m = qtype != Q6_K;
    const int64_t ng = K / QK, nj = K / G;
    for (int64_t t = 0; t * 16 < M; t++) {
        const int8_t *xt = xb + t * 16 * K;
        const float *xscT = xscT0 + t * ng * 16, *xsT = xsT0 + t * ng * 16;
        __m512 acc[16];
        for (int n = 0; n < 16; n++) acc[n] = _mm512_setzero_ps();
        // groups j, j + 1 into C tiles 0, 1 and j + 2, j + 3 into 2, 3: one pair's products run on the tile unit
        // while the other pair is flushed (nj is a multiple of 8: K of whole super-blocks)
        DP2(0, 1, 0);
        for (int64_t j = 0; j < nj; j += 4) {
            DP2(2, 3, j + 2);
            FLUSH2(0, 1, j);
            if (j + 4 < nj) DP2(0, 1, j + 4);
            FLUSH2(2, 3, j + 2);
        }
        for (int n = 0; n < 16; n++) _mm512_store_ps(ob + n * 16, acc[n]);
        const int mt = (int)(M - t * 16 < 16 ? M - t * 16 : 16);
        for (int r = 0; r < mt; r++)
            for (int n = 0; n < nr; n++) y[(t * 16 + r) * ldy + n] = ob[n * 16 + r];
    }
}

int tm_qlinear_amx_i8(int qtype, const int8_t *xb, const float *xscT, const float *xsT, int64_t M, int64_t K,
                      const uint8_t *w, int64_t N, float *y, int64_t ldy) {
    if (!i8_direct_type(qtype) || K % QK_K != 0) return -1;
    const int G = qtype == Q6_K ? 16 : 32;
    const int64_t row_bytes = K / QK_K * block_bytes(qtype);
    int rc = 0;
#pragma omp parallel if (TM_TOP_LEVEL && N >= 32)
    {
        int8_t *wq = (int8_t *)aligned_alloc(64, (size_t)(16 * K));
        float *wd = (float *)aligned_alloc(64, (size_t)(16 * (K / G)) * sizeof(float) + 64);
        float *wm = (float *)aligned_alloc(64, (size_t)(16 * (K / QK)) * sizeof(float) + 64);
        int32_t *cb = (int32_t *)aligned_alloc(64, 256 * sizeof(int32_t));
        float *ob = (float *)aligned_alloc(64, 256 * sizeof(float));
        if (!wq || !wd || !wm || !cb || !ob) {
#pragma omp atomic write
            rc = -1;
        } else {
            amx_i8_config(G);
#pragma omp for schedule(static)
            for (int64_t n0 = 0; n0 < N; n0 += 16) {
                const int nr = (int)(N - n0 < 16 ? N - n0 : 16);
                switch (qtype) {
                    case Q4_K:
                        decode_panel(Q4_K, w + n0 * row_bytes, row_bytes, K, nr, wq, wd, wm);
                        panel_rows(Q4_K, wq, wd, wm, xb, xscT, xsT, M, K, nr, y + n0, ldy, cb, ob);
                        break;
                    case Q5_K:
                        decode_panel(Q5_K, w + n0 * row_bytes, row_bytes, K, nr, wq, wd, wm);
                        panel_rows(Q5_K, wq, wd, wm, xb, xscT, xsT, M, K, nr, y + n0, ldy, cb, ob);
                        break;
                    default:
                        decode_panel(Q6_K, w + n0 * row_bytes, row_bytes, K, nr, wq, wd, wm);
                        panel_rows(Q6_K, wq, wd, wm, xb, xscT, xsT, M, K, nr, y + n0, ldy, cb, ob);
                        break;
                }
            }
            _tile_release();
        }
        free(wq); free(wd); free(wm); free(cb); free(ob);
    }
    return rc;
}
#endif  // TM_AMX_I8
