// y[M,N] = x[M,K] @ W[N,K]^T (+ bias) with W stored as raw GGUF blocks (Q4_0, Q4_1, Q8_0 here; Q5_0, Q5_1, Q4_K,
// Q5_K, Q6_K through qlinear_k.c's inner loops).
//
// Same math as dequantize-then-matmul: each weight is dequantized to float32 exactly as gguf's dequantizer does
// (Q4_0: d*(q-8), Q4_1: d*q+m, Q8_0: d*q), activations stay float32; only the summation order differs.
// Work is split over output columns (OpenMP). Each thread dequantizes a tile of NC columns into a small float
// buffer (L1/L2 resident) once, then runs an MR x NC register-blocked micro-kernel over all rows of x, so the
// unpacking cost is paid once per weight per 64-row chunk of x and x stays in cache.
//
// With AVX-512 (F + BW) the kernels run 16-wide; otherwise AVX2 8-wide; otherwise scalar. Same math in each.
// Large M may take the AMX path (qlinear_amx.c). Block layouts and the block helpers: quant.h.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"

#define NC 4      // output columns per tile
#define MCHUNK 64 // rows of x per pass (keeps the x chunk in L2)

// Dequantize one row of K weights (K/32 blocks) into out[K].
static void dequant_row(int qtype, const uint8_t *row, int64_t K, float *out) {
    if (float16_type(qtype)) {
        for (int64_t k = 0; k < K; k++) out[k] = qtype == BF16 ? bf16_to_f32(row + 2 * k) : f16_to_f32(row + 2 * k);
        return;
    }
    if (generic_type(qtype)) {
        tm_dequant_row_gen(qtype, row, K, out);
        return;
    }
    const int bb = block_bytes(qtype);
    const int64_t nb = K / QK;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        float *o = out + b * QK;
        const float d = f16_to_f32(blk);
        if (qtype == Q8_0) {
            const int8_t *qs = (const int8_t *)(blk + 2);
#if defined(TM_AVX512)
            const __m512 dv = _mm512_set1_ps(d);
            for (int i = 0; i < 2; i++) {
                __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16 * i)));
                _mm512_storeu_ps(o + 16 * i, _mm512_mul_ps(_mm512_cvtepi32_ps(q), dv));
            }
#elif defined(__AVX2__)
            const __m256 dv = _mm256_set1_ps(d);
            for (int i = 0; i < 4; i++) {
                __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * i)));
                _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), dv));
            }
#else
            for (int i = 0; i < QK; i++) o[i] = (float)qs[i] * d;
#endif
            continue;
        }
        const uint8_t *qs = blk + (qtype == Q4_1 ? 4 : 2);
#if defined(TM_AVX512)
        {
            const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
            const __m128i m4 = _mm_set1_epi8(0x0f);
            __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, m4)));
            __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4)));
            const __m512 dv = _mm512_set1_ps(d);
            const __m512 mv = _mm512_set1_ps(qtype == Q4_1 ? f16_to_f32(blk + 2) : 0.0f);
            if (qtype != Q4_1) {
                const __m512 eight = _mm512_set1_ps(8.0f);
                q0 = _mm512_sub_ps(q0, eight);
                q1 = _mm512_sub_ps(q1, eight);
            }
            _mm512_storeu_ps(o, qtype == Q4_1 ? _mm512_fmadd_ps(q0, dv, mv) : _mm512_mul_ps(q0, dv));
            _mm512_storeu_ps(o + 16, qtype == Q4_1 ? _mm512_fmadd_ps(q1, dv, mv) : _mm512_mul_ps(q1, dv));
        }
#elif defined(__AVX2__)
        const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
        const __m128i m4 = _mm_set1_epi8(0x0f);
        const __m128i lo = _mm_and_si128(raw, m4);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        __m256 q[4];
        q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        const __m256 dv = _mm256_set1_ps(d);
        if (qtype == Q4_1) {
            const __m256 mv = _mm256_set1_ps(f16_to_f32(blk + 2));
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(q[i], dv, mv));
        } else {
            const __m256 eight = _mm256_set1_ps(8.0f);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(_mm256_sub_ps(q[i], eight), dv));
        }
#else
        if (qtype == Q4_1) {
            const float m = f16_to_f32(blk + 2);
            for (int j = 0; j < 16; j++) {
                o[j] = d * (float)(qs[j] & 0x0f) + m;
                o[j + 16] = d * (float)(qs[j] >> 4) + m;
            }
        } else {
            for (int j = 0; j < 16; j++) {
                o[j] = d * (float)((int)(qs[j] & 0x0f) - 8);
                o[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
            }
        }
#endif
    }
}

// acc over rows x[0..MR) and the NC dequantized columns in w (w[c*K + k]); writes y[r*ldy + c] for c < nc.
#define MICRO(MR)                                                                                            \
    static void micro_##MR(const float *x, int64_t ldx, const float *w, int64_t K, float *y, int64_t ldy,  \
                           int nc, const float *bias) {                                                     \
        MICRO_BODY(MR)                                                                                       \
    }

#if defined(TM_AVX512)
#define MICRO_BODY(MR)                                                                                       \
    __m512 acc[MR][NC];                                                                                      \
    for (int r = 0; r < MR; r++)                                                                             \
        for (int c = 0; c < NC; c++) acc[r][c] = _mm512_setzero_ps();                                        \
    for (int64_t k = 0; k < K; k += 16) {                                                                    \
        __m512 xv[MR];                                                                                       \
        for (int r = 0; r < MR; r++) xv[r] = _mm512_loadu_ps(x + r * ldx + k);                               \
        for (int c = 0; c < NC; c++) {                                                                       \
            const __m512 wv = _mm512_loadu_ps(w + c * K + k);                                                \
            for (int r = 0; r < MR; r++) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);                  \
        }                                                                                                    \
    }                                                                                                        \
    for (int r = 0; r < MR; r++)                                                                             \
        for (int c = 0; c < nc; c++) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]) + (bias ? bias[c] : 0.0f);
#elif defined(__AVX2__)
#define MICRO_BODY(MR)                                                                                       \
    __m256 acc[MR][NC];                                                                                      \
    for (int r = 0; r < MR; r++)                                                                             \
        for (int c = 0; c < NC; c++) acc[r][c] = _mm256_setzero_ps();                                        \
    for (int64_t k = 0; k < K; k += 8) {                                                                     \
        __m256 xv[MR];                                                                                       \
        for (int r = 0; r < MR; r++) xv[r] = _mm256_loadu_ps(x + r * ldx + k);                               \
        for (int c = 0; c < NC; c++) {                                                                       \
            const __m256 wv = _mm256_loadu_ps(w + c * K + k);                                                \
            for (int r = 0; r < MR; r++) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);                  \
        }                                                                                                    \
    }                                                                                                        \
    for (int r = 0; r < MR; r++)                                                                             \
        for (int c = 0; c < nc; c++) y[r * ldy + c] = hsum8(acc[r][c]) + (bias ? bias[c] : 0.0f);
#else
#define MICRO_BODY(MR)                                                                                       \
    float acc[MR][NC] = {{0}};                                                                               \
    for (int64_t k = 0; k < K; k++)                                                                          \
        for (int c = 0; c < NC; c++)                                                                         \
            for (int r = 0; r < MR; r++) acc[r][c] += x[r * ldx + k] * w[c * K + k];                         \
    for (int r = 0; r < MR; r++)                                                                             \
        for (int c = 0; c < nc; c++) y[r * ldy + c] = acc[r][c] + (bias ? bias[c] : 0.0f);
#endif

MICRO(1)
MICRO(2)
MICRO(3)

// Few rows (decode): no float buffer. Each block is unpacked into registers once and used for R <= 3 rows:
// sum_i w_i x_i = d * sum_i q_i x_i + m * sum_i x_i per block (Q4_0: m = -8d, Q8_0: m = 0), the block sums of x
// (xs[r * nb + b]) precomputed. Same weights as dequant_row, summed in another order.
#define DIRECT_PREFETCH 4096  // bytes ahead in the weight stream (2-6 KiB measured alike)
#if defined(TM_AVX512)
// direct_tile for a compile-time row count R and block type (always inlined into the dispatcher below, so the
// accumulators live in registers). Blocks go in pairs into two accumulators per row: one FMA chain would bound
// the loop by its latency.
static inline __attribute__((always_inline)) void direct_tile512(const int R, const int qtype, const float *x,
                                                                 const float *xs, int64_t K, const uint8_t *wrow,
                                                                 float *y, int64_t ldy, float bias) {
    const int bb = block_bytes(qtype);
    const int64_t nb = K / QK;
    __m512 a0[DIRECT_MAX_ROWS], a1[DIRECT_MAX_ROWS];
    float s0[DIRECT_MAX_ROWS], s1[DIRECT_MAX_ROWS];
    for (int r = 0; r < R; r++) { a0[r] = a1[r] = _mm512_setzero_ps(); s0[r] = s1[r] = 0.0f; }
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512 q0, q1, p0, p1;
        float d, m, e, n;
        // the weight stream runs ahead of the loads (rows are contiguous): without it one thread reads ~3 GB/s
        _mm_prefetch((const char *)(wrow + b * bb) + DIRECT_PREFETCH, _MM_HINT_T0);
        block512(qtype, wrow + b * bb, &q0, &q1, &d, &m);
        block512(qtype, wrow + (b + 1) * bb, &p0, &p1, &e, &n);
        const __m512 dv = _mm512_set1_ps(d), ev = _mm512_set1_ps(e);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * K + b * QK;
            const __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(xb)));
            const __m512 u = _mm512_fmadd_ps(p1, _mm512_loadu_ps(xb + 48), _mm512_mul_ps(p0, _mm512_loadu_ps(xb + 32)));
            a0[r] = _mm512_fmadd_ps(t, dv, a0[r]);
            a1[r] = _mm512_fmadd_ps(u, ev, a1[r]);
            s0[r] += m * xs[r * nb + b];
            s1[r] += n * xs[r * nb + b + 1];
        }
    }
    if (b < nb) {
        __m512 q0, q1;
        float d, m;
        block512(qtype, wrow + b * bb, &q0, &q1, &d, &m);
        const __m512 dv = _mm512_set1_ps(d);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * K + b * QK;
            const __m512 t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(xb)));
            a0[r] = _mm512_fmadd_ps(t, dv, a0[r]);
            s0[r] += m * xs[r * nb + b];
        }
    }
    for (int r = 0; r < R; r++)
        y[r * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])) + (s0[r] + s1[r]) + bias;
}

#define TILE512(R, QT) direct_tile512(R, QT, x, xs, K, wrow, y, ldy, bias)
#define TILE512_ROWS(QT) (R == 1 ? TILE512(1, QT) : R == 2 ? TILE512(2, QT) : TILE512(3, QT))
static void direct_tile(int qtype, const float *x, const float *xs, int R, int64_t K, const uint8_t *wrow,
                        float *y, int64_t ldy, float bias) {
    if (generic_type(qtype)) tm_direct_tile_gen(qtype, x, xs, R, K, wrow, y, ldy, bias);
    else if (qtype == Q4_1) TILE512_ROWS(Q4_1);
    else if (qtype == Q4_0) TILE512_ROWS(Q4_0);
    else if (qtype == BF16) TILE512_ROWS(BF16);
    else if (qtype == F16) TILE512_ROWS(F16);
    else TILE512_ROWS(Q8_0);
}
#else
static void direct_tile(int qtype, const float *x, const float *xs, int R, int64_t K, const uint8_t *wrow,
                        float *y, int64_t ldy, float bias) {
    if (generic_type(qtype)) {
        tm_direct_tile_gen(qtype, x, xs, R, K, wrow, y, ldy, bias);
        return;
    }
    const int bb = block_bytes(qtype);
    const int64_t nb = K / QK;
    if (float16_type(qtype)) {  // (AVX2 / scalar builds) each block converted, then dotted with the rows
        float w[QK], acc[DIRECT_MAX_ROWS] = {0};
        for (int64_t b = 0; b < nb; b++) {
            dequant_row(qtype, wrow + b * bb, QK, w);
            for (int r = 0; r < R; r++)
                for (int i = 0; i < QK; i++) acc[r] += w[i] * x[r * K + b * QK + i];
        }
        for (int r = 0; r < R; r++) y[r * ldy] = acc[r] + bias;
        return;
    }
#if defined(__AVX2__)
    __m256 acc[DIRECT_MAX_ROWS];
    float msum[DIRECT_MAX_ROWS];
    for (int r = 0; r < R; r++) { acc[r] = _mm256_setzero_ps(); msum[r] = 0.0f; }
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + b * bb;
        const float d = f16_to_f32(blk);
        __m256 q0, q1, q2, q3;
        float m = 0.0f;
        if (qtype == Q8_0) {
            const int8_t *qs = (const int8_t *)(blk + 2);
            q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qs)));
            q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8))));
            q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 16))));
            q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 24))));
        } else {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + (qtype == Q4_1 ? 4 : 2)));
            const __m128i lo = _mm_and_si128(raw, m4);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
            q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            m = qtype == Q4_1 ? f16_to_f32(blk + 2) : -8.0f * d;
        }
        const __m256 dv = _mm256_set1_ps(d);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * K + b * QK;
            __m256 t = _mm256_mul_ps(q0, _mm256_loadu_ps(xb));
            t = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb + 8), t);
            t = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xb + 16), t);
            t = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xb + 24), t);
            acc[r] = _mm256_fmadd_ps(t, dv, acc[r]);
            msum[r] += m * xs[r * nb + b];
        }
    }
    for (int r = 0; r < R; r++) y[r * ldy] = hsum8(acc[r]) + msum[r] + bias;
#else
    float w[QK];
    float acc[DIRECT_MAX_ROWS] = {0};
    (void)xs;
    for (int64_t b = 0; b < nb; b++) {
        dequant_row(qtype, wrow + b * bb, QK, w);
        for (int r = 0; r < R; r++)
            for (int i = 0; i < QK; i++) acc[r] += w[i] * x[r * K + b * QK + i];
    }
    for (int r = 0; r < R; r++) y[r * ldy] = acc[r] + bias;
#endif
}
#endif  // TM_AVX512

static int qlinear_direct(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                          const float *bias, float *y, int64_t ldy, int approx) {
    const int64_t nb = K / QK, row_bytes = K / block_weights(qtype) * block_bytes(qtype);  // nb: groups of 32
    float *xs = (float *)malloc((size_t)(M * nb + 1) * sizeof(float));
    if (!xs) return -1;
#if defined(TM_I8_DIRECT)
    if (approx && i8_direct_type(qtype)) {  // int8 activations, as llama.cpp decodes (gemm auto)
        int8_t *xq = (int8_t *)malloc((size_t)(M * K + 64)), *xqv = (int8_t *)malloc((size_t)(M * K + 64));
        float *xsc = (float *)malloc((size_t)(M * nb + 1) * sizeof(float));
        float *xsc2 = (float *)malloc((size_t)(M * K / 16 + 16) * sizeof(float));
        float *xs16 = (float *)malloc((size_t)(M * K / 16 + 16) * sizeof(float));
        int rc = -1;
        if (xq && xqv && xsc && xsc2 && xs16) {
            tm_prepare_x_i8(x, M, K, xq, xsc, xs, xqv, xsc2, xs16);
#pragma omp parallel for schedule(static) if (TM_TOP_LEVEL && N * K * M >= (1 << 15))
            for (int64_t n = 0; n < N; n++)
                tm_qlinear_i8_prepared(qtype, xqv, xsc2, xs, xs16, M, K, w + n * row_bytes, 1, bias ? bias + n : NULL,
                                       y + n, ldy);
            rc = 0;
        }
        free(xq); free(xqv); free(xsc); free(xsc2); free(xs16); free(xs);
        return rc;
    }
#else
    (void)approx;
#endif
    for (int64_t i = 0; i < M * nb; i++) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += x[i * QK + j];
        xs[i] = s;
    }
#pragma omp parallel for schedule(static) if (TM_TOP_LEVEL && N * K * M >= (1 << 15))
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += DIRECT_MAX_ROWS) {
            const int R = (int)(M - m < DIRECT_MAX_ROWS ? M - m : DIRECT_MAX_ROWS);
            direct_tile(qtype, x + m * K, xs + m * nb, R, K, w + n * row_bytes, y + m * ldy + n, ldy,
                        bias ? bias[n] : 0.0f);
        }
    }
    free(xs);
    return 0;
}

// y[M, N] with row stride ldy (>= N). Returns 0 on success, -1 on bad arguments (K not a multiple of the block,
// unknown type) or out of memory. amx_min_m > 0 is gemm auto (approximate kernels allowed): M >= amx_min_m rows take
// the AMX bf16 path where tm_amx_init() enabled it, and the k-quants' direct path takes int8 activations where the
// compiler targets AVX512-VNNI. Otherwise (amx_min_m 0: exact float32) M <= direct_max_m rows take the register path
// (no float buffer), larger M the buffered micro-kernel.
static int qlinear_ld(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                      float *y, int64_t ldy, int64_t direct_max_m, int64_t amx_min_m) {
    const int bb = block_bytes(qtype);
    if (bb == 0 || K % block_weights(qtype) != 0 || M < 0 || N < 0 || ldy < N) return -1;
#if defined(TM_AMX)
    if (amx_min_m > 0 && M >= amx_min_m && tm_amx_enabled())
        return tm_qlinear_amx(qtype, x, M, K, w, N, bias, y, ldy);
#else
    (void)amx_min_m;
#endif
    if (M <= direct_max_m) return qlinear_direct(qtype, x, M, K, w, N, bias, y, ldy, amx_min_m > 0);
    const int64_t row_bytes = (K / block_weights(qtype)) * bb;
    const int64_t ntiles = (N + NC - 1) / NC;
#pragma omp parallel if (TM_TOP_LEVEL)
    {
        float *wbuf = (float *)aligned_alloc(64, (size_t)(NC * K * sizeof(float) + 64) & ~(size_t)63);
        for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
            const int64_t mend = m0 + MCHUNK < M ? m0 + MCHUNK : M;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < ntiles; t++) {
                const int64_t n0 = t * NC;
                const int nc = (int)(N - n0 < NC ? N - n0 : NC);
                for (int c = 0; c < nc; c++) dequant_row(qtype, w + (n0 + c) * row_bytes, K, wbuf + c * K);
                if (nc < NC) memset(wbuf + nc * K, 0, (size_t)(NC - nc) * K * sizeof(float));
                const float *bt = bias ? bias + n0 : NULL;
                int64_t m = m0;
                for (; m + 3 <= mend; m += 3) micro_3(x + m * K, K, wbuf, K, y + m * ldy + n0, ldy, nc, bt);
                if (mend - m == 2) micro_2(x + m * K, K, wbuf, K, y + m * ldy + n0, ldy, nc, bt);
                else if (mend - m == 1) micro_1(x + m * K, K, wbuf, K, y + m * ldy + n0, ldy, nc, bt);
            }
        }
        free(wbuf);
    }
    return 0;
}

int tm_qlinear_i8_direct(void) {
#if defined(TM_I8_DIRECT)
    return 1;
#else
    return 0;
#endif
}

int qlinear_f32(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                float *y, int64_t direct_max_m, int64_t amx_min_m) {
    return qlinear_ld(qtype, x, M, K, w, N, bias, y, N, direct_max_m, amx_min_m);
}

int qlinear_any(int qtype, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *bias,
                float *y, int64_t direct_max_m, int64_t amx_min_m) {
    if (qtype == TM_QPANELS) {
        const tm_qpanels *p = (const tm_qpanels *)w;
        const int bb = block_bytes((int)p->qtype);
        if (bb == 0 || K % block_weights((int)p->qtype) != 0 || M < 0 || N < 0) return -1;
        if (p->i8) {  // int8 panels (a GGUF's blocks on a VNNI CPU without AMX: qlinear_i8gemm.c)
            if (p->panels && amx_min_m > 0 && M >= amx_min_m && tm_qlinear_i8g_available())
                return tm_qlinear_i8g_panels((const uint8_t *)p->panels, x, M, K, N, bias, y, N, p->glu, NULL);
            return qlinear_ld((int)p->qtype, x, M, K, p->w, N, bias, y, N, direct_max_m, amx_min_m);
        }
#if defined(TM_AMX)
        if (p->panels && amx_min_m > 0 && M >= amx_min_m && tm_amx_enabled())
            return tm_qlinear_amx_panels(p->panels, x, M, K, N, bias, y, N, p->glu);
#endif
        // no tile unit: the panels on AVX512-BF16 (qlinear_bf16.c), the same numerics
        if (p->panels && amx_min_m > 0 && M >= amx_min_m && tm_qlinear_bf16_available())
            return tm_qlinear_bf16_panels(p->panels, x, M, K, N, bias, y, N, p->glu, NULL);
        return qlinear_ld((int)p->qtype, x, M, K, p->w, N, bias, y, N, direct_max_m, amx_min_m);
    }
    if (qtype != TM_QPARTS)
        return qlinear_ld(qtype, x, M, K, (const uint8_t *)w, N, bias, y, N, direct_max_m, amx_min_m);
    const tm_qparts *p = (const tm_qparts *)w;
    int64_t total = 0;
    if (p->n < 1 || p->n > TM_QPARTS_MAX) return -1;
    for (int64_t i = 0; i < p->n; i++) total += p->rows[i];
    if (total != N) return -1;
    for (int64_t i = 0, off = 0; i < p->n; off += p->rows[i], i++) {
        const int rc = qlinear_ld((int)p->qtype[i], x, M, K, p->w[i], p->rows[i], bias ? bias + off : NULL, y + off, N,
                                  direct_max_m, amx_min_m);
        if (rc) return rc;
    }
    return 0;
}

int tm_qlinear_glu(int qtype, const float *x, int64_t M, int64_t K, const void *w, int64_t I, const float *bias,
                   float *act, int64_t amx_min_m) {
    if (qtype != TM_QPANELS) return 0;
    const tm_qpanels *p = (const tm_qpanels *)w;
    if (!p->panels || p->glu != I || amx_min_m <= 0 || M < amx_min_m) return 0;
    if (p->i8) {  // int8 panels (qlinear_i8gemm.c)
        if (!tm_qlinear_i8g_available()) return 0;
        return tm_qlinear_i8g_panels((const uint8_t *)p->panels, x, M, K, 2 * I, bias, NULL, 0, I, act) == 0 ? 1 : -1;
    }
#if defined(TM_AMX)
    if (tm_amx_enabled()) return tm_qlinear_amx_glu(p->panels, x, M, K, I, bias, act) == 0 ? 1 : -1;
#endif
    if (tm_qlinear_bf16_available())  // no tile unit: AVX512-BF16 (qlinear_bf16.c)
        return tm_qlinear_bf16_panels(p->panels, x, M, K, 2 * I, bias, NULL, 0, I, act) == 0 ? 1 : -1;
    return 0;
}

// out[r, :] = dequantized row rows[r] of W [N, K] (an embedding lookup). Returns 0, -1 on bad arguments,
// -2 when a row index is outside [0, N).
int qdequant_rows(int qtype, const uint8_t *w, int64_t N, int64_t K, const int64_t *rows, int64_t R, float *out) {
    const int bb = block_bytes(qtype);
    if (bb == 0 || K % block_weights(qtype) != 0) return -1;
    for (int64_t r = 0; r < R; r++)
        if (rows[r] < 0 || rows[r] >= N) return -2;
    const int64_t row_bytes = (K / block_weights(qtype)) * bb;
#pragma omp parallel for schedule(static) if (TM_TOP_LEVEL && R > 16)
    for (int64_t r = 0; r < R; r++) dequant_row(qtype, w + rows[r] * row_bytes, K, out + r * K);
    return 0;
}
