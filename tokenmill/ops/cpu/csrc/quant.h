// GGUF quantized blocks (Q4_0, Q4_1, Q8_0; 32 weights each), shared by the linear kernels qlinear.c and
// qlinear_amx.c: the block layouts, and the static inline helpers their inner loops inline (each unit gets its own
// copy, as when they lived in one file).
//
// Block layouts (little endian):  Q4_0: f16 d, u8 qs[16]      (18 bytes; weight j = qs[j] & 15, j+16 = qs[j] >> 4)
//                                 Q4_1: f16 d, f16 m, u8 qs[16] (20 bytes; same nibble order)
//                                 Q8_0: f16 d, i8 qs[32]       (34 bytes)
#ifndef TM_QUANT_H
#define TM_QUANT_H

#include <stdint.h>
#include <string.h>
#include "simd.h"

#define QK 32

enum { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

// Bytes of one block of qtype (0: unknown type).
static inline int block_bytes(int qtype) {
    switch (qtype) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q8_0: return 34;
        default: return 0;
    }
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

#if defined(TM_AVX512)
// One block as two vectors of 16 integer weights (as floats), with its scale d and offset m (w = d*q + m).
static inline __attribute__((always_inline)) void block512(const int qtype, const uint8_t *blk, __m512 *q0, __m512 *q1,
                                                           float *d, float *m) {
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

// The AMX path (qlinear_amx.c) exists where the compiler targets AMX-TILE + AMX-BF16 + AVX512-BF16 (-march=native
// on Sapphire Rapids and later).
#if defined(TM_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define TM_AMX 1
// 1 once tm_amx_init() has obtained the kernel's permission for tile data.
int tm_amx_enabled(void);
// y[M,N] = x[M,K] @ W[N,K]^T (+ bias) on the tile unit; K % 32 == 0 (checked by qlinear_f32). 0, -1 out of memory.
int tm_qlinear_amx(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                   float *y);
#endif

#endif  // TM_QUANT_H
