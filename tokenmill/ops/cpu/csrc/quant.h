// GGUF quantized blocks, shared by the linear kernels qlinear.c, qlinear_k.c and qlinear_amx.c: the block layouts,
// and the static inline helpers their inner loops inline (each unit gets its own copy, as when they lived in one
// file).
//
// Block layouts (little endian):  Q4_0: f16 d, u8 qs[16]      (18 bytes; weight j = qs[j] & 15, j+16 = qs[j] >> 4)
//                                 Q4_1: f16 d, f16 m, u8 qs[16] (20 bytes; same nibble order)
//                                 Q8_0: f16 d, i8 qs[32]       (34 bytes)
//                                 Q5_0: f16 d, u32 qh, u8 qs[16] (22 bytes; nibbles as Q4_0, fifth bit of weight j
//                                       = bit j of qh; w = d * (q - 16))
//                                 Q5_1: f16 d, f16 m, u32 qh, u8 qs[16] (24 bytes; w = d * q + m)
// k-quants, super-blocks of 256 weights = 8 sub-blocks of 32 (tokenmill/ops/cpu/qlinear.py's reference documents
// the bit layouts):               Q4_K: f16 d, f16 dmin, u8 scales[12], u8 qs[128]          (144 bytes)
//                                 Q5_K: f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128] (176 bytes)
//                                 Q6_K: u8 ql[128], u8 qh[64], i8 scales[16], f16 d          (210 bytes)
// 16-bit floats (a bf16 / f16 checkpoint's weights kept as they are; a "block" is 32 of them, no scale):
//                                 BF16: u16 w[32] (64 bytes);  F16: f16 w[32] (64 bytes)
// Q4_0, Q4_1 and Q8_0 have their own tuned paths (qlinear.c); the others ("generic" types, qlinear_k.c) are
// read one sub-block of 32 weights at a time: 32 small integers q[l] and w[l] = dlo * q[l] + m for l < 16,
// dhi * q[l] + m for l >= 16 (dlo == dhi except for Q6_K, whose scales cover 16 weights each).
#ifndef TM_QUANT_H
#define TM_QUANT_H

#include <stdint.h>
#include <string.h>
#include "simd.h"

#define QK 32

#define QK_K 256

enum { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q5_0 = 3, Q5_1 = 4, Q4_K = 5, Q5_K = 6, Q6_K = 7, BF16 = 8, F16 = 9 };

// Bytes of one block of qtype (0: unknown type).
static inline int block_bytes(int qtype) {
    switch (qtype) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q8_0: return 34;
        case Q5_0: return 22;
        case Q5_1: return 24;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case Q6_K: return 210;
        case BF16: return 64;
        case F16: return 64;
        default: return 0;
    }
}

// Weights per block of qtype: 32, or 256 for the k-quants.
static inline int block_weights(int qtype) { return qtype >= Q4_K && qtype <= Q6_K ? QK_K : QK; }

// The 16-bit float types (no scale: w = the value itself).
static inline int float16_type(int qtype) { return qtype == BF16 || qtype == F16; }

// The types read through the generic sub-block helpers below (qlinear_k.c).
static inline int generic_type(int qtype) { return qtype >= Q5_0 && qtype <= Q6_K; }

static inline float bf16_to_f32(const uint8_t *p) {
    const uint32_t bits = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalize
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// Generic types: the scales of sub-block s (0 .. block_weights / 32 - 1) of the block at blk (see the top).
static inline __attribute__((always_inline)) void gen_sub_scales(const int qtype, const uint8_t *blk, int s,
                                                                 float *dlo, float *dhi, float *m) {
    if (qtype == Q6_K) {
        const float d = f16_to_f32(blk + 208);
        const int8_t *sc = (const int8_t *)(blk + 192);
        *dlo = d * (float)sc[2 * s];
        *dhi = d * (float)sc[2 * s + 1];
        *m = 0.0f;
    } else if (qtype == Q4_K || qtype == Q5_K) {
        const uint8_t *q = blk + 4;
        int sc, mn;
        if (s < 4) {
            sc = q[s] & 63;
            mn = q[s + 4] & 63;
        } else {
            sc = (q[s + 4] & 0x0f) | ((q[s - 4] >> 6) << 4);
            mn = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
        }
        *dlo = *dhi = f16_to_f32(blk) * (float)sc;
        *m = -(f16_to_f32(blk + 2) * (float)mn);
    } else {  // Q5_0, Q5_1
        *dlo = *dhi = f16_to_f32(blk);
        *m = qtype == Q5_1 ? f16_to_f32(blk + 2) : 0.0f;
    }
}

// Generic types: the 32 integers of sub-block s, scalar.
static inline void gen_sub_q(const int qtype, const uint8_t *blk, int s, int8_t *q) {
    if (qtype == Q5_0 || qtype == Q5_1) {
        const int off = qtype == Q5_0 ? 2 : 4;
        const uint32_t qh = (uint32_t)blk[off] | ((uint32_t)blk[off + 1] << 8) | ((uint32_t)blk[off + 2] << 16) |
                            ((uint32_t)blk[off + 3] << 24);
        const uint8_t *qs = blk + off + 4;
        for (int l = 0; l < 16; l++) {
            q[l] = (int8_t)((qs[l] & 0x0f) | (((qh >> l) & 1) << 4));
            q[l + 16] = (int8_t)((qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4));
        }
        if (qtype == Q5_0)
            for (int l = 0; l < 32; l++) q[l] -= 16;
    } else if (qtype == Q4_K || qtype == Q5_K) {
        const uint8_t *qs = blk + (qtype == Q4_K ? 16 : 48) + 32 * (s / 2);
        const int sh = 4 * (s & 1);
        for (int l = 0; l < 32; l++) {
            int v = (qs[l] >> sh) & 0x0f;
            if (qtype == Q5_K) v |= ((blk[16 + l] >> s) & 1) << 4;
            q[l] = (int8_t)v;
        }
    } else {  // Q6_K
        const int h = s / 4, t = s % 4;
        const uint8_t *ql = blk + 64 * h + 32 * (t & 1), *qh = blk + 128 + 32 * h;
        for (int l = 0; l < 32; l++)
            q[l] = (int8_t)((((ql[l] >> (4 * (t >> 1))) & 0x0f) | (((qh[l] >> (2 * t)) & 3) << 4)) - 32);
    }
}

#if defined(__AVX2__)
// Generic types: the 32 integers of sub-block s as int8 lanes (lane l = weight l).
static inline __attribute__((always_inline)) __m256i gen_sub_q256(const int qtype, const uint8_t *blk, int s) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    if (qtype == Q5_0 || qtype == Q5_1) {
        const int off = qtype == Q5_0 ? 2 : 4;
        const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + off + 4));
        const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
        // bit l of qh -> byte l: broadcast byte l / 8 to lanes l, then test bit l % 8
        uint32_t qh;
        memcpy(&qh, blk + off, 4);
        const __m256i spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32((int)qh),
            _mm256_setr_epi64x(0x0000000000000000LL, 0x0101010101010101LL, 0x0202020202020202LL,
                               0x0303030303030303LL));
        const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
        const __m256i hi = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                                            _mm256_set1_epi8(0x10));
        const __m256i q = _mm256_or_si256(nib, hi);
        return qtype == Q5_0 ? _mm256_sub_epi8(q, _mm256_set1_epi8(16)) : q;
    }
    if (qtype == Q4_K || qtype == Q5_K) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + (qtype == Q4_K ? 16 : 48) + 32 * (s / 2)));
        __m256i q = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (s & 1)), m4);
        if (qtype == Q5_K) {
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
            const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(qh, s), _mm256_set1_epi8(1));
            q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
        }
        return q;
    }
    // Q6_K
    const int h = s / 4, t = s % 4;
    const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (t & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (t >> 1)), m4);
    const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * t), _mm256_set1_epi8(3)), 4);
    return _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
}
#endif  // __AVX2__

#if defined(TM_AVX512)
// One block as two vectors of 16 integer weights (as floats), with its scale d and offset m (w = d*q + m).
static inline __attribute__((always_inline)) void block512(const int qtype, const uint8_t *blk, __m512 *q0, __m512 *q1,
                                                           float *d, float *m) {
    if (float16_type(qtype)) {  // the weights themselves: d = 1, m = 0
        const __m256i lo = _mm256_loadu_si256((const __m256i *)blk), hi = _mm256_loadu_si256((const __m256i *)(blk + 32));
        if (qtype == BF16) {
            *q0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(lo), 16));
            *q1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        } else {
            *q0 = _mm512_cvtph_ps(lo);
            *q1 = _mm512_cvtph_ps(hi);
        }
        *d = 1.0f;
        *m = 0.0f;
        return;
    }
    if (qtype != Q4_1) *d = f16_to_f32(blk);
    if (qtype == Q8_0) {
        const int8_t *qs = (const int8_t *)(blk + 2);
        *q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qs)));
        *q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16))));
        *m = 0.0f;
    } else {
        const __m128i m4 = _mm_set1_epi8(0x0f);
        const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + (qtype == Q4_1 ? 4 : 2)));
        *q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, m4)));
        *q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4)));
        if (qtype == Q4_1) {  // d and m are adjacent: one conversion for both
            int32_t dm;
            memcpy(&dm, blk, 4);
            const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
            *d = _mm_cvtss_f32(f);
            *m = _mm_cvtss_f32(_mm_movehdup_ps(f));
        } else {
            *m = -8.0f * *d;
        }
    }
}
#endif  // TM_AVX512

#if defined(TM_AVX512)
// K-quants: the super-block at blk's 8 sub-blocks' scales d (dlo of gen_sub_scales) and mins m (Q4_K, Q5_K: the 12
// scale bytes unpacked 4 at a time, as llama.cpp does; m untouched for Q6_K), or Q6_K's 16 scales (one per 16
// weights: dlo, dhi of sub-block s are d[2s], d[2s + 1]); the same float products as gen_sub_scales.
static inline __attribute__((always_inline)) void kquant_scales(const int qtype, const uint8_t *blk, float *d,
                                                                float *m) {
    if (qtype == Q6_K) {
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192))));
        _mm512_storeu_ps(d, _mm512_mul_ps(_mm512_set1_ps(f16_to_f32(blk + 208)), sc));
        return;
    }
    uint32_t u[4];
    memcpy(u, blk + 4, 12);
    const uint32_t m1 = 0x3f3f3f3fu, m2 = 0x0f0f0f0fu, m3 = 0x03030303u;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);  // mins 4..7
    const uint32_t mins = u[1] & m1;                        // mins 0..3
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);         // scales 4..7
    u[2] = mins;
    u[0] &= m1;  // scales 0..3
    const __m128i b = _mm_setr_epi32((int)u[0], (int)u[1], (int)u[2], (int)u[3]);  // (a load would stall on the stores)
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
    _mm256_storeu_ps(d, _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(blk)), sc));
    _mm256_storeu_ps(m, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(blk + 2)), mn)));
}
#endif  // TM_AVX512

// Rows of x the direct (register) path takes at a time.
#define DIRECT_MAX_ROWS 3

// qlinear_k.c, for the generic types: row (K weights) -> out[K]; and y[r * ldy] = x[r] . row (+ bias) for R <= 3
// rows of x (row stride K), xs[r * K / 32 + g] the sum of x row r over weights 32g .. 32g + 31.
void tm_dequant_row_gen(int qtype, const uint8_t *row, int64_t K, float *out);
void tm_direct_tile_gen(int qtype, const float *x, const float *xs, int R, int64_t K, const uint8_t *wrow, float *y,
                        int64_t ldy, float bias);

// The int8-activation variant of the direct path for the k-quants (qlinear_i8.c), where the compiler targets
// AVX512-VNNI: x row r is rounded per sub-block of 32 (x ~= xsc[g] * xq, xq in [-127, 127]), each sub-block's
// weight integers meet xq in a byte dot product (vpdpbusd) and the scales multiply the integer sums. llama.cpp's
// decode math (its Q8_K activations), here with a scale per 32 values; only for gemm auto (an approximation).
#if defined(TM_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TM_I8_DIRECT 1
// Rows of x one pass over the weights serves (more rows: several passes, each weight row then read from cache).
#define I8_TILE_ROWS 8
static inline int i8_direct_type(int qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K; }
// x [M, K] rounded once for many calls: xq [M, K], xsc [M, K / 32] (scales), xs [M, K / 32] (sums of each 32 of the
// rounded x: the mins' term, so the result is exactly W . rounded x); for tm_qlinear_i8_prepared also xqv [M, K]
// (xq in its vectors' order), xsc2 [M, K / 16] (each scale twice) and xs16 [M, K / 16] (-32 times the sums of each
// 16: Q6_K's offset).
void tm_prepare_x_i8(const float *x, int64_t M, int64_t K, int8_t *xq, float *xsc, float *xs, int8_t *xqv,
                     float *xsc2, float *xs16);
// y[M, N] (row stride ldy) = rounded x . W^T (+ bias, may be NULL) from a prepared x, on the calling thread (no
// allocation): qlinear's direct path per output row, moe.c's tasks. Up to I8_TILE_ROWS rows in one pass.
void tm_qlinear_i8_prepared(int qtype, const int8_t *xqv, const float *xsc2, const float *xs, const float *xs16,
                            int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias, float *y,
                            int64_t ldy);
#endif

// The AMX path (qlinear_amx.c) exists where the compiler targets AMX-TILE + AMX-BF16 + AVX512-BF16 (-march=native
// on Sapphire Rapids and later).
#if defined(TM_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define TM_AMX 1
// 1 once tm_amx_init() has obtained the kernel's permission for tile data.
int tm_amx_enabled(void);
// y[M,N] (row stride ldy) = x[M,K] @ W[N,K]^T (+ bias) on the tile unit; K a multiple of the block (checked by
// qlinear_f32). 0, -1 out of memory.
int tm_qlinear_amx(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                   float *y, int64_t ldy);
// The same from x already in bf16 (rows xs16 >= K elements apart, readable up to the next multiple of 16 rows;
// tm_x_to_bf16 makes it: K a multiple of 32), no bias: the fused MoE op converts an expert's rows once for all its
// tasks. 0, -1 bad arguments or out of memory.
int tm_qlinear_amx_bf16x(int qtype, const uint16_t *x16, int64_t xs16, int64_t M, int64_t K, const uint8_t *w,
                         int64_t N, float *y, int64_t ldy);
// out[m, :K] (rows ldo apart) = x[m, :] (M rows of K, a multiple of 32) rounded to bf16 (nearest even), as amx_gemm
// rounds x.
void tm_x_to_bf16(const float *x, int64_t M, int64_t K, uint16_t *out, int64_t ldo);
// The same from W's panels packed once by tm_qlinear_amx_pack (kernels.h): no dequantization per call (glu > 0:
// tm_qlinear_amx_pack_glu's panels of a gate|up W with N = 2 * glu; the output columns as usual).
int tm_qlinear_amx_panels(const uint32_t *panels, const float *x, int64_t M, int64_t K, int64_t N, const float *bias,
                          float *y, int64_t ldy, int64_t glu);
// act[M, I] = silu(gate) * up of x @ W^T (+ bias) from tm_qlinear_amx_pack_glu's panels of W [2I, K] (I % 16 == 0),
// the gate|up output never written. 0, -1 bad arguments / out of memory.
int tm_qlinear_amx_glu(const uint32_t *panels, const float *x, int64_t M, int64_t K, int64_t I, const float *bias,
                       float *act);
#endif

// The AMX int8 path for the k-quants (qlinear_amx_i8.c): int8 activations as the direct path's, any number of rows.
#if defined(TM_AMX) && defined(TM_I8_DIRECT) && defined(__AMX_INT8__)
#define TM_AMX_I8 1
// Bytes of x in quad layout for M rows of K (rows padded to a multiple of 16).
int64_t tm_amx_i8_x_bytes(int64_t M, int64_t K);
// A prepared x (tm_prepare_x_i8: xq [M, K], xsc and xs [M, K / 32]) -> per tile of 16 rows t: xb (t * 16 * K bytes
// on: [K / 32 sub-blocks][8 quads][16 rows][4]), xscT and xsT ([t][K / 32][16 rows]); padding rows zero.
void tm_prepare_x_amx_i8(const int8_t *xq, const float *xsc, const float *xs, int64_t M, int64_t K, int8_t *xb,
                         float *xscT, float *xsT);
// y[M, N] (row stride ldy) = rounded x . W^T from x prepared as above, W Q4_K / Q5_K / Q6_K with K a multiple of 256;
// the tile state must be granted (tm_amx_enabled). 0, -1 bad type / K or out of memory.
int tm_qlinear_amx_i8(int qtype, const int8_t *xb, const float *xscT, const float *xsT, int64_t M, int64_t K,
                      const uint8_t *w, int64_t N, float *y, int64_t ldy);
#endif

#endif  // TM_QUANT_H
