/* AVX-512 micro-kernels of the paged attention (attention.c): scores S = Q K^T and acc += P V, reading K/V
 * straight from the pool in float32, bfloat16, int8 or fp8 e4m3 (the element `kind`, attention.c's KV_* codes),
 * converted to float32 in registers: no conversion pass through scratch memory. bf16 -> f32 is a 16-bit shift;
 * int8 a sign extension and an int -> float conversion (the per-(token, head) scales are applied by attention.c
 * to the score columns and to the probabilities, not here); e4m3 is rebuilt as a float16 (sign | exponent and
 * mantissa shifted left by 7) and converted by vcvtph2ps, whose result is 2^-8 of the e4m3 value (float16's
 * exponent bias is 15, e4m3's 7: the 2^8 goes into the per-head scale; subnormals come out exact).
 * 16 lanes cover half a 32-dim slice of a head; D % 16 == 0.
 * Included by attention.c only (static inline: the NR/W/kind constants fold after inlining). */
#ifndef TM_ATTENTION_AVX512_H
#define TM_ATTENTION_AVX512_H
#ifdef TM_AVX512
#include <immintrin.h>

/* bytes of one element of a pool of this kind */
static inline __attribute__((always_inline)) int kind_size(const int kind) {
    return kind == 0 ? 4 : (kind == 3 || kind == 4) ? 1 : 2;
}

/* 16 elements at p (kind: 0 float32, 1 bfloat16, 3 int8, 4 fp8 e4m3 / 256) as float32 lanes */
static inline __attribute__((always_inline)) __m512 load16(const char *p, const int kind) {
    if (kind == 1)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)),
                                                     16));
    if (kind == 3) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    if (kind == 4) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
        const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                          _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
        return _mm512_cvtph_ps(h);
    }
    return _mm512_loadu_ps((const float *)p);
}

/* the 4 lane-sums of a, b, c, d as one __m128 {sum a, sum b, sum c, sum d} */
static inline __attribute__((always_inline)) __m128 hsum4x16(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  /* a0 b0 a1 b1 per 128 */
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE)); /* a b c d x4 */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* S[i, j] = Q[i] . K[j] for NR rows (Q rows contiguous float32, D apart), nk keys (row stride kst elements of
 * esize bytes) */
static inline __attribute__((always_inline)) void scores512_rows(const int NR, float *S, int sst, const float *Q,
                                                                 const char *K, int64_t kst, int nk, int D,
                                                                 const int kind) {
    const int es = kind_size(kind);
    const int64_t kb = kst * es;
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        const char *k0 = K + j * kb;
        __m512 c[3][4];
        for (int i = 0; i < NR; i++)
            for (int u = 0; u < 4; u++) c[i][u] = _mm512_setzero_ps();
        for (int x = 0; x < D; x += 16) {
            __m512 kv[4];
            for (int u = 0; u < 4; u++) kv[u] = load16(k0 + u * kb + (int64_t)x * es, kind);
            for (int i = 0; i < NR; i++) {
                __m512 qv = _mm512_loadu_ps(Q + i * D + x);
                for (int u = 0; u < 4; u++) c[i][u] = _mm512_fmadd_ps(qv, kv[u], c[i][u]);
            }
        }
        for (int i = 0; i < NR; i++) _mm_storeu_ps(S + i * sst + j, hsum4x16(c[i][0], c[i][1], c[i][2], c[i][3]));
    }
    for (; j < nk; j++) {
        const char *kj = K + j * kb;
        for (int i = 0; i < NR; i++) {
            __m512 a = _mm512_setzero_ps();
            for (int x = 0; x < D; x += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(Q + i * D + x), load16(kj + (int64_t)x * es, kind), a);
            S[i * sst + j] = _mm512_reduce_add_ps(a);
        }
    }
}

static inline __attribute__((always_inline)) void scores512_kind(const int kind, float *S, int sst, const float *Q,
                                                                 int R, const char *K, int64_t kst, int nk, int D) {
    int r = 0;
    for (; r + 3 <= R; r += 3) scores512_rows(3, S + (int64_t)r * sst, sst, Q + (int64_t)r * D, K, kst, nk, D, kind);
    if (R - r == 2) scores512_rows(2, S + (int64_t)r * sst, sst, Q + (int64_t)r * D, K, kst, nk, D, kind);
    if (R - r == 1) scores512_rows(1, S + (int64_t)r * sst, sst, Q + (int64_t)r * D, K, kst, nk, D, kind);
}

static void scores512(float *S, int sst, const float *Q, int R, const char *K, int64_t kst, int nk, int D, int kind) {
    switch (kind) {
    case 1: scores512_kind(1, S, sst, Q, R, K, kst, nk, D); break;
    case 3: scores512_kind(3, S, sst, Q, R, K, kst, nk, D); break;
    case 4: scores512_kind(4, S, sst, Q, R, K, kst, nk, D); break;
    default: scores512_kind(0, S, sst, Q, R, K, kst, nk, D);
    }
}

/* acc[i, x:x+16W] += sum_j P[i, j] V[j, x:x+16W] for NR rows */
static inline __attribute__((always_inline)) void pv512_tile(const int NR, const int W, float *acc, const float *P,
                                                             int pst, const char *V, int64_t vst, int nk, int D,
                                                             int x, const int kind) {
    const int es = kind_size(kind);
    const int64_t vb = vst * es;
    __m512 c[4][4];
    for (int i = 0; i < NR; i++)
        for (int w = 0; w < W; w++) c[i][w] = _mm512_loadu_ps(acc + i * D + x + 16 * w);
    for (int j = 0; j < nk; j++) {
        __m512 v[4];
        for (int w = 0; w < W; w++) v[w] = load16(V + j * vb + (int64_t)(x + 16 * w) * es, kind);
        for (int i = 0; i < NR; i++) {
            __m512 b = _mm512_set1_ps(P[i * pst + j]);
            for (int w = 0; w < W; w++) c[i][w] = _mm512_fmadd_ps(b, v[w], c[i][w]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int w = 0; w < W; w++) _mm512_storeu_ps(acc + i * D + x + 16 * w, c[i][w]);
}

static inline __attribute__((always_inline)) void pv512_rows(const int NR, float *acc, const float *P, int pst,
                                                             const char *V, int64_t vst, int nk, int D,
                                                             const int kind) {
    int x = 0;
    for (; x + 64 <= D; x += 64) pv512_tile(NR, 4, acc, P, pst, V, vst, nk, D, x, kind);
    if (x + 32 <= D) { pv512_tile(NR, 2, acc, P, pst, V, vst, nk, D, x, kind); x += 32; }
    if (x + 16 <= D) pv512_tile(NR, 1, acc, P, pst, V, vst, nk, D, x, kind);
}

static inline __attribute__((always_inline)) void pv512_kind(const int kind, float *acc, const float *P, int pst,
                                                             int R, const char *V, int64_t vst, int nk, int D) {
    int r = 0;
    for (; r + 4 <= R; r += 4) pv512_rows(4, acc + (int64_t)r * D, P + r * pst, pst, V, vst, nk, D, kind);
    if (R - r == 3) pv512_rows(3, acc + (int64_t)r * D, P + r * pst, pst, V, vst, nk, D, kind);
    if (R - r == 2) pv512_rows(2, acc + (int64_t)r * D, P + r * pst, pst, V, vst, nk, D, kind);
    if (R - r == 1) pv512_rows(1, acc + (int64_t)r * D, P + r * pst, pst, V, vst, nk, D, kind);
}

static void pv512(float *acc, const float *P, int pst, int R, const char *V, int64_t vst, int nk, int D, int kind) {
    switch (kind) {
    case 1: pv512_kind(1, acc, P, pst, R, V, vst, nk, D); break;
    case 3: pv512_kind(3, acc, P, pst, R, V, vst, nk, D); break;
    case 4: pv512_kind(4, acc, P, pst, R, V, vst, nk, D); break;
    default: pv512_kind(0, acc, P, pst, R, V, vst, nk, D);
    }
}

#endif  /* TM_AVX512 */
#endif  /* TM_ATTENTION_AVX512_H */
