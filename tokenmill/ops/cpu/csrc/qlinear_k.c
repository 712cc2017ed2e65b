// The packed-linear inner loops for the "generic" GGUF types (quant.h): Q5_0, Q5_1 and the k-quants Q4_K, Q5_K,
// Q6_K. qlinear.c calls them from its two paths (and qlinear_amx.c reads the same sub-blocks):
//   tm_dequant_row_gen   one row of K weights into floats: the buffered many-rows path and embedding lookups;
//   tm_direct_tile_gen   y = x . row for 1-3 rows of x straight from the packed bytes (decode), no float copy.
// Each sub-block of 32 weights is 32 small integers q and scales (dlo, dhi, m) with w = d * q + m, d = dlo for the
// first 16 weights and dhi for the last 16; sum_l w_l x_l = dlo * sum_{l<16} q_l x_l + dhi * sum_{l>=16} q_l x_l
// + m * sum_l x_l, the sub-block sums of x precomputed by the caller. Same weights as the reference dequantizer,
// summed in another order. AVX-512 16-wide, AVX2 8-wide, else scalar, as qlinear.c.
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"

#define GEN_PREFETCH 4096  // bytes ahead in the weight stream, as qlinear.c's direct path

// ---- one row -> floats ----
static inline __attribute__((always_inline)) void dequant_row_t(const int qtype, const uint8_t *row, int64_t K,
                                                                float *out) {
    const int bb = block_bytes(qtype), nsub = block_weights(qtype) / QK;
    const int64_t nb = K / block_weights(qtype);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        for (int s = 0; s < nsub; s++) {
            float dlo, dhi, m;
            gen_sub_scales(qtype, blk, s, &dlo, &dhi, &m);
            float *o = out + (b * nsub + s) * QK;
#if defined(TM_AVX512)
            const __m256i q = gen_sub_q256(qtype, blk, s);
            const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            const __m512 mv = _mm512_set1_ps(m);
            _mm512_storeu_ps(o, _mm512_fmadd_ps(q0, _mm512_set1_ps(dlo), mv));
            _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(q1, _mm512_set1_ps(dhi), mv));
#elif defined(__AVX2__)
            const __m256i q = gen_sub_q256(qtype, blk, s);
            const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            const __m256 mv = _mm256_set1_ps(m), dl = _mm256_set1_ps(dlo), dh = _mm256_set1_ps(dhi);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), dl, mv));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                                                    dl, mv));
            _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), dh, mv));
            _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                                                     dh, mv));
#else
            int8_t q[QK];
            gen_sub_q(qtype, blk, s, q);
            for (int l = 0; l < QK; l++) o[l] = (l < 16 ? dlo : dhi) * (float)q[l] + m;
#endif
        }
    }
}

void tm_dequant_row_gen(int qtype, const uint8_t *row, int64_t K, float *out) {
    switch (qtype) {
        case Q5_0: dequant_row_t(Q5_0, row, K, out); break;
        case Q5_1: dequant_row_t(Q5_1, row, K, out); break;
        case Q4_K: dequant_row_t(Q4_K, row, K, out); break;
        case Q5_K: dequant_row_t(Q5_K, row, K, out); break;
        case Q6_K: dequant_row_t(Q6_K, row, K, out); break;
        default: break;
    }
}

// ---- 1-3 rows of x against one packed row ----
// For a compile-time row count R and type (always inlined into the dispatcher, so the accumulators stay in
// registers). Two accumulators per row (first / last 16 weights of each sub-block): one FMA chain would bound the
// loop by its latency. xs[r * K / 32 + g] = sum of x row r over sub-block g.
static inline __attribute__((always_inline)) void gen_tile(const int R, const int qtype, const float *x,
                                                           const float *xs, int64_t K, const uint8_t *wrow,
                                                           float *y, int64_t ldy, float bias) {
    const int bb = block_bytes(qtype), nsub = block_weights(qtype) / QK;
    const int64_t nb = K / block_weights(qtype), ng = K / QK;
    const int has_m = qtype == Q5_1 || qtype == Q4_K || qtype == Q5_K;
    float msum[DIRECT_MAX_ROWS];
#if defined(TM_AVX512)
    __m512 a0[DIRECT_MAX_ROWS], a1[DIRECT_MAX_ROWS];
    for (int r = 0; r < R; r++) { a0[r] = a1[r] = _mm512_setzero_ps(); msum[r] = 0.0f; }
#elif defined(__AVX2__)
    __m256 a0[DIRECT_MAX_ROWS], a1[DIRECT_MAX_ROWS];
    for (int r = 0; r < R; r++) { a0[r] = a1[r] = _mm256_setzero_ps(); msum[r] = 0.0f; }
#else
    float a0[DIRECT_MAX_ROWS];
    for (int r = 0; r < R; r++) { a0[r] = 0.0f; msum[r] = 0.0f; }
#endif
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + b * bb;
        // the weight stream runs ahead of the loads (rows are contiguous), one prefetch per cache line
        for (int off = 0; off < bb; off += 64) __builtin_prefetch(blk + GEN_PREFETCH + off, 0, 3);
        float dlo[QK_K / QK], dhi[QK_K / QK], mv[QK_K / QK];  // the block's scales, decoded once
        for (int s = 0; s < nsub; s++) gen_sub_scales(qtype, blk, s, &dlo[s], &dhi[s], &mv[s]);
        for (int s = 0; s < nsub; s++) {
            const int64_t g = b * nsub + s;
#if defined(TM_AVX512)
            const __m256i q = gen_sub_q256(qtype, blk, s);
            const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            const __m512 dl = _mm512_set1_ps(dlo[s]);
            for (int r = 0; r < R; r++) {
                const float *xb = x + r * K + g * QK;
                if (qtype == Q6_K) {  // a scale per 16 weights
                    a0[r] = _mm512_fmadd_ps(_mm512_mul_ps(q0, _mm512_loadu_ps(xb)), dl, a0[r]);
                    a1[r] = _mm512_fmadd_ps(_mm512_mul_ps(q1, _mm512_loadu_ps(xb + 16)), _mm512_set1_ps(dhi[s]), a1[r]);
                } else {  // one per 32: sub-blocks alternate between the two accumulators
                    const __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16),
                                                     _mm512_mul_ps(q0, _mm512_loadu_ps(xb)));
                    if (s & 1) a1[r] = _mm512_fmadd_ps(t, dl, a1[r]);
                    else a0[r] = _mm512_fmadd_ps(t, dl, a0[r]);
                }
                if (has_m) msum[r] += mv[s] * xs[r * ng + g];
            }
#elif defined(__AVX2__)
            const __m256i q = gen_sub_q256(qtype, blk, s);
            const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
            const __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            const __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
            const __m256 dl = _mm256_set1_ps(dlo[s]), dh = _mm256_set1_ps(dhi[s]);
            for (int r = 0; r < R; r++) {
                const float *xb = x + r * K + g * QK;
                const __m256 t = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(q0, _mm256_loadu_ps(xb)));
                const __m256 u = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xb + 24),
                                                 _mm256_mul_ps(q2, _mm256_loadu_ps(xb + 16)));
                a0[r] = _mm256_fmadd_ps(t, dl, a0[r]);
                a1[r] = _mm256_fmadd_ps(u, dh, a1[r]);
                if (has_m) msum[r] += mv[s] * xs[r * ng + g];
            }
#else
            int8_t q[QK];
            gen_sub_q(qtype, blk, s, q);
            for (int r = 0; r < R; r++) {
                const float *xb = x + r * K + g * QK;
                float t = 0.0f, u = 0.0f;
                for (int l = 0; l < 16; l++) {
                    t += (float)q[l] * xb[l];
                    u += (float)q[l + 16] * xb[l + 16];
                }
                a0[r] += dlo[s] * t + dhi[s] * u;
                if (has_m) msum[r] += mv[s] * xs[r * ng + g];
            }
#endif
        }
    }
    for (int r = 0; r < R; r++) {
#if defined(TM_AVX512)
        y[r * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])) + msum[r] + bias;
#elif defined(__AVX2__)
        y[r * ldy] = hsum8(_mm256_add_ps(a0[r], a1[r])) + msum[r] + bias;
#else
        y[r * ldy] = a0[r] + msum[r] + bias;
#endif
    }
}

#define GEN_TILE(R, QT) gen_tile(R, QT, x, xs, K, wrow, y, ldy, bias)
#define GEN_TILE_ROWS(QT) (R == 1 ? GEN_TILE(1, QT) : R == 2 ? GEN_TILE(2, QT) : GEN_TILE(3, QT))

void tm_direct_tile_gen(int qtype, const float *x, const float *xs, int R, int64_t K, const uint8_t *wrow, float *y,
                        int64_t ldy, float bias) {
    switch (qtype) {
        case Q5_0: GEN_TILE_ROWS(Q5_0); break;
        case Q5_1: GEN_TILE_ROWS(Q5_1); break;
        case Q4_K: GEN_TILE_ROWS(Q4_K); break;
        case Q5_K: GEN_TILE_ROWS(Q5_K); break;
        case Q6_K: GEN_TILE_ROWS(Q6_K); break;
        default: break;
    }
}
