// gemm auto's int8-activation path for a few rows of x against packed k-quant weights (Q4_K, Q5_K, Q6_K), where the
// compiler targets AVX512-VNNI: the decode calls of the dense layers (qlinear.c's direct path) and the experts that
// get 1 to a few rows in a step (moe.c). llama.cpp's decode arithmetic with a scale per 32 values of x: x row r is
// rounded per 32 values (x ~= xsc[g] * xq, xq in [-127, 127]), each weight's small integer meets xq in a byte dot
// product (vpdpbusd) and the float scales multiply the integer sums.
//
// One pass over a packed weight row serves all R rows of x (R <= I8_TILE_ROWS). Each super-block of 256 weights is
// decoded once into four 512-bit vectors of unsigned integers laid out so that 32-bit lanes 2s and 2s + 1 of every
// vector hold weights of sub-block s (vector v: weights 8v .. 8v + 7 of each of the 8 sub-blocks), and x is stored
// in the same order (xqv, prepared once per row). Then the vpdpbusd of consecutive vectors accumulate into one
// integer register whose lanes never mix sub-blocks: per super-block and row, 4 vpdpbusd, one conversion and one
// FMA by the lanes' scales (the sub-block's weight scale times x's, xsc2; Q6_K, whose scales cover 16 weights:
// vectors 0-1 and 2-3 apart, two of each). The mins of Q4_K / Q5_K and Q6_K's +32 offset are one FMA per
// super-block and row against sums of the rounded x (xs per 32, xs16 per 16). The row's lanes are summed once per
// output.
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"

#if defined(TM_I8_DIRECT)

// Software prefetch of the weight stream (rows are contiguous): into L1 this many bytes ahead, and into L2 further
// ahead (2 threads streaming 150-220 MB of Q4_K / Q6_K rows: 16-18 GB/s against 15-16 with one prefetch 1-16 KiB
// ahead, 12-15 with none; a plain 2-thread read reaches 20-22).
#define I8_PREFETCH_L1 1024
#define I8_PREFETCH_L2 8192

void tm_prepare_x_i8(const float *x, int64_t M, int64_t K, int8_t *xq, float *xsc, float *xs, int8_t *xqv,
                     float *xsc2, float *xs16) {
    for (int64_t i = 0; i < M * K / QK; i++) {
        const float *xb = x + i * QK;
        const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m512 iv = _mm512_set1_ps(inv);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(lo, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(hi, iv));
        _mm_storeu_si128((__m128i *)(xq + i * QK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + i * QK + 16), _mm512_cvtsepi32_epi8(q1));
        const int32_t s0 = _mm512_reduce_add_epi32(q0), s1 = _mm512_reduce_add_epi32(q1);
        xsc[i] = d;
        xs[i] = d * (float)(s0 + s1);  // the sums from the rounded x: the result is exactly W . rounded x
        xs16[2 * i] = -32.0f * d * (float)s0;
        xs16[2 * i + 1] = -32.0f * d * (float)s1;
        xsc2[2 * i] = xsc2[2 * i + 1] = d;
        // the vectors' order: weights 8v .. 8v + 7 of sub-block s at byte 64v + 8s of its super-block
        const int64_t sb = i / (QK_K / QK), s = i % (QK_K / QK);
        for (int v = 0; v < 4; v++) memcpy(xqv + sb * QK_K + 64 * v + 8 * s, xq + i * QK + 8 * v, 8);
    }
}

// The super-block at blk as four vectors of 64 unsigned weight integers in the order above (vector v, 8-byte group
// s: weights 8v .. 8v + 7 of sub-block s), with the scales of lanes 2s, 2s + 1: Q4_K / Q5_K d (sub-block s's) and
// m8 (its min, per sub-block in natural order); Q6_K dlo (the scale of weights 0-15 of sub-block s, vectors 0-1),
// dhi (16-31, vectors 2-3) and d16 (the 16 scales in natural order, against xs16).
static inline __attribute__((always_inline)) void decode_block(const int qtype, const uint8_t *blk, __m512i *wv,
                                                               __m512 *dlo, __m512 *dhi, __m256 *m8, __m512 *d16) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    if (qtype == Q6_K) {
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192))));
        *d16 = _mm512_mul_ps(_mm512_set1_ps(f16_to_f32(blk + 208)), sc);
        *dlo = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14), *d16);
        *dhi = _mm512_permutexvar_ps(_mm512_setr_epi32(1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15), *d16);
        // sub-block s = 4h + t: low 4 bits in ql[64h + 32 (t & 1) + l] >> 4 (t >> 1), high 2 in qh[32h + l] >> 2t
        // (rotated to bits 4-5 of the byte: left by 4 - 2t)
        const __m512i ql0 = _mm512_loadu_si512((const void *)blk), ql1 = _mm512_loadu_si512((const void *)(blk + 64));
        const __m512i qh = _mm512_loadu_si512((const void *)(blk + 128));
        const __m512i shl = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4), rot = _mm512_setr_epi64(4, 2, 0, 62, 4, 2, 0, 62);
        for (int v = 0; v < 4; v++) {
            const __m512i lo = _mm512_permutex2var_epi64(ql0, _mm512_setr_epi64(v, 4 + v, v, 4 + v, 8 + v, 12 + v,
                                                                                  8 + v, 12 + v), ql1);
            const __m512i hi = _mm512_permutexvar_epi64(_mm512_setr_epi64(v, v, v, v, 4 + v, 4 + v, 4 + v, 4 + v), qh);
            wv[v] = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi64(lo, shl), m4),
                                    _mm512_and_si512(_mm512_rolv_epi64(hi, rot), _mm512_set1_epi8(0x30)));
        }
        return;
    }
    // Q4_K / Q5_K: the 12 scale bytes unpacked 4 at a time (kquant_scales' arithmetic, kept in registers)
    uint32_t u[4];
    memcpy(u, blk + 4, 12);
    const uint32_t k1 = 0x3f3f3f3fu, k2 = 0x0f0f0f0fu, k3 = 0x03030303u;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);  // mins 4..7
    const uint32_t mins = u[1] & k1;                        // mins 0..3
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);         // scales 4..7
    u[2] = mins;
    u[0] &= k1;  // scales 0..3
    const __m128i b = _mm_setr_epi32((int)u[0], (int)u[1], (int)u[2], (int)u[3]);
    const __m256 d8 = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)));
    *m8 = _mm256_mul_ps(_mm256_set1_ps(-f16_to_f32(blk + 2)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))));
    *dlo = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                 _mm512_castps256_ps512(d8));
    // qs[32j + l]: weight l of sub-block 2j (low nibble) and 2j + 1 (high nibble); group s = 2j + h of vector v is
    // 8-byte word 4j + v of qs, shifted right by 4h
    const uint8_t *qs = blk + (qtype == Q4_K ? 16 : 48);
    const __m512i q0 = _mm512_loadu_si512((const void *)qs), q1 = _mm512_loadu_si512((const void *)(qs + 64));
    const __m512i sh = _mm512_setr_epi64(0, 4, 0, 4, 0, 4, 0, 4);
    for (int v = 0; v < 4; v++)
        wv[v] = _mm512_and_si512(
            _mm512_srlv_epi64(_mm512_permutex2var_epi64(q0, _mm512_setr_epi64(v, v, 4 + v, 4 + v, 8 + v, 8 + v,
                                                                               12 + v, 12 + v), q1), sh), m4);
    if (qtype == Q5_K) {  // the fifth bit of weight l of sub-block s: bit s of qh[l]
        // group s of a vector takes bit s of each byte of qh[8v .. 8v + 7] (weights 8v .. 8v + 7)
        const __m512i bs = _mm512_setr_epi64(0x0101010101010101LL, 0x0202020202020202LL, 0x0404040404040404LL,
                                             0x0808080808080808LL, 0x1010101010101010LL, 0x2020202020202020LL,
                                             0x4040404040404040LL, (int64_t)0x8080808080808080ULL);
        for (int v = 0; v < 4; v++) {
            int64_t h;
            memcpy(&h, blk + 16 + 8 * v, 8);
            const __mmask64 k = _mm512_test_epi8_mask(_mm512_set1_epi64(h), bs);
            wv[v] = _mm512_mask_add_epi8(wv[v], k, wv[v], _mm512_set1_epi8(16));
        }
    }
    *dhi = *dlo;
}

// y[r * ldy] = rounded x row r . wrow (+ bias) for a compile-time R rows (always inlined into the dispatcher, so
// the accumulators stay in registers).
static inline __attribute__((always_inline)) void tile_i8(const int R, const int qtype, const int8_t *xqv,
                                                          const float *xsc2, const float *xs, const float *xs16,
                                                          int64_t K, const uint8_t *wrow, float *y, int64_t ldy,
                                                          float bias) {
    const int bb = block_bytes(qtype);
    const int64_t nb = K / QK_K;
    __m512 acc[I8_TILE_ROWS], ms16[I8_TILE_ROWS];
    __m256 ms8[I8_TILE_ROWS];
    for (int r = 0; r < R; r++) {
        acc[r] = ms16[r] = _mm512_setzero_ps();
        ms8[r] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + b * bb;
        for (int off = 0; off < bb; off += 64) {
            __builtin_prefetch(blk + I8_PREFETCH_L1 + off, 0, 3);
            __builtin_prefetch(blk + I8_PREFETCH_L2 + off, 0, 2);
        }
        __m512i wv[4];
        __m512 dlo, dhi, d16 = _mm512_setzero_ps();
        __m256 m8 = _mm256_setzero_ps();
        decode_block(qtype, blk, wv, &dlo, &dhi, &m8, &d16);
        for (int r = 0; r < R; r++) {
            const int8_t *xr = xqv + r * K + b * QK_K;
            const __m512 sx = _mm512_loadu_ps(xsc2 + r * (K / 16) + b * 16);
#define XV(v) _mm512_loadu_si512((const void *)(xr + 64 * (v)))
            const __m512i p01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], XV(0)), wv[1], XV(1));
            const __m512i p23 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[2], XV(2)), wv[3], XV(3));
#undef XV
            if (qtype == Q6_K) {
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), _mm512_mul_ps(dlo, sx), acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), _mm512_mul_ps(dhi, sx), acc[r]);
                ms16[r] = _mm512_fmadd_ps(d16, _mm512_loadu_ps(xs16 + r * (K / 16) + b * 16), ms16[r]);
            } else {
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p01, p23)), _mm512_mul_ps(dlo, sx), acc[r]);
                ms8[r] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xs + r * (K / QK) + b * 8), ms8[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const __m512 t = qtype == Q6_K ? _mm512_add_ps(acc[r], ms16[r])
                                       : _mm512_add_ps(acc[r], _mm512_zextps256_ps512(ms8[r]));
        y[r * ldy] = _mm512_reduce_add_ps(t) + bias;
    }
}

#define TILE(R, QT) tile_i8(R, QT, xqv, xsc2, xs, xs16, K, wrow, y, ldy, bias)
#define TILE_ROWS(QT)                  \
    switch (R) {                       \
        case 1: TILE(1, QT); break;    \
        case 2: TILE(2, QT); break;    \
        case 3: TILE(3, QT); break;    \
        case 4: TILE(4, QT); break;    \
        case 5: TILE(5, QT); break;    \
        case 6: TILE(6, QT); break;    \
        case 7: TILE(7, QT); break;    \
        default: TILE(8, QT); break;   \
    }

static void tile_any(int qtype, const int8_t *xqv, const float *xsc2, const float *xs, const float *xs16, int R,
                     int64_t K, const uint8_t *wrow, float *y, int64_t ldy, float bias) {
    switch (qtype) {
        case Q4_K: TILE_ROWS(Q4_K); break;
        case Q5_K: TILE_ROWS(Q5_K); break;
        case Q6_K: TILE_ROWS(Q6_K); break;
        default: break;
    }
}

void tm_qlinear_i8_prepared(int qtype, const int8_t *xqv, const float *xsc2, const float *xs, const float *xs16,
                            int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias, float *y,
                            int64_t ldy) {
    const int64_t row_bytes = K / QK_K * block_bytes(qtype);
    const int64_t groups = (M + I8_TILE_ROWS - 1) / I8_TILE_ROWS;  // rows split evenly: 9 = 5 + 4, not 8 + 1
    for (int64_t n = 0; n < N; n++)
        for (int64_t gi = 0, m = 0; gi < groups; gi++) {
            const int R = (int)((M - m) / (groups - gi));
            tile_any(qtype, xqv + m * K, xsc2 + m * (K / 16), xs + m * (K / QK), xs16 + m * (K / 16), R, K,
                     w + n * row_bytes, y + m * ldy + n, ldy, bias ? bias[n] : 0.0f);
            m += R;
        }
}

#endif  // TM_I8_DIRECT
