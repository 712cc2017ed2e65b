// y[M,N] = x[M,K] @ W[N,K]^T (+ bias) with AVX512-BF16's vdpbf16ps, for CPUs with AVX512-BF16 but no AMX (Zen 4):
// the AMX path's numerics (qlinear_amx.c) without the tile unit. W (a 16-bit float weight, or any GGUF block type,
// dequantized) is arranged once at load into the AMX panels' bf16 pair layout (tm_qlinear_bf16_pack: the words
// tm_qlinear_amx_pack makes, so one set of panels serves either path); x is rounded to bf16 (round to nearest
// even) once per call; each vdpbf16ps adds two bf16 products to a float32 lane.
//
// Panel layout (qlinear_amx.c): panels of 16 output rows, each [K/32 k-blocks][16 k-pairs][16 outputs] 32-bit
// words (word = bf16 of k = 2p, 2p + 1 of that output row), i.e. [K/2 k-pairs][16 outputs]; two panels (32
// outputs) side by side; rows past N zero. With glu = I (a gate|up weight [2I, K]) pair pp holds gate rows 16pp ..
// and up rows 16pp .. (tm_qlinear_bf16_pack_glu).
//
// Micro-kernel: R <= BF16_MR rows of x times one pair of panels: 2R zmm accumulators (16 outputs each), per k-pair
// two weight vectors and one broadcast x pair per row. Work: OpenMP over panel pairs inside chunks of rows (x of a
// chunk stays in L2), each pair's 2 x K x 32 bytes re-read from L2 by its row blocks.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"
#include "simd.h"

#if defined(TM_AVX512) && defined(__AVX512BF16__)
#define TM_BF16DOT 1

#define BF16_MR 12             // rows per micro-kernel call: 24 accumulators + 2 weights + 1 broadcast of 32 zmm
#define BF16_CHUNK_BYTES 196608 // bf16 x per row chunk (192 KiB: L2-resident with a pair's panels)

int tm_qlinear_bf16_available(void) { return 1; }

// Rows n0 .. n0 + 15 of W (rows >= N zero; row_bytes bytes a row of qtype blocks) as one panel of K/2 x 16 words:
// each weight dequantized as qlinear.c's dequant_row does (gguf's dequantizer; a 16-bit weight exactly), then rounded
// to bf16 (nearest even, vcvtne2ps2bf16: dequantized weights are never float32 subnormals, which it would flush):
// the AMX panels' values (their packer dequantizes the same blocks, possibly with a fused multiply-add where
// dequant_row rounds twice: a last-bit difference before the bf16 rounding). buf: 16 x K floats. Each 16 x 16 block
// of words (16 rows' pairs) is converted and transposed in registers.
static void pack_panel(int qtype, const uint8_t *w, int64_t K, int64_t N, int64_t n0, uint32_t *panel, float *buf) {
    const int64_t kp = K / 2;
    int64_t rows[16];
    int nr = 0;
    for (; nr < 16 && n0 + nr < N; nr++) rows[nr] = n0 + nr;
    qdequant_rows(qtype, w, N, K, rows, nr, buf);  // one call (its OpenMP region once, not per row)
    if (nr < 16) memset(buf + nr * K, 0, (size_t)((16 - nr) * K) * sizeof(float));
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {  // K % 32 == 0: whole blocks of 16 pairs
        __m512i r[16];
        for (int j = 0; j < 16; j++) {
            const float *b = buf + j * K + 2 * p0;
            r[j] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(b + 16), _mm512_loadu_ps(b));
        }
        tm_transpose16(r);
        for (int p = 0; p < 16; p++) _mm512_storeu_si512((void *)(panel + (p0 + p) * 16), r[p]);
    }
}

static int pack_args_ok(int qtype, int64_t K) {
    return block_bytes(qtype) != 0 && K > 0 && K % QK == 0 && K % block_weights(qtype) == 0;
}

// All panels of W: glu = 0, ceil(N / 32) * 2 panels of rows 16pn ..; glu = I (W = [gate; up], N = 2I), pair pn
// holds gate rows 16pn .. then up rows 16pn ... Returns 0, -3 out of memory.
static int pack_all(int qtype, const uint8_t *w, int64_t K, int64_t N, int64_t glu, uint32_t *out) {
    const int64_t row_bytes = K / block_weights(qtype) * block_bytes(qtype);
    const int64_t n = glu ? glu / 16 : (N + 31) / 32 * 2;
    int bad = 0;
#pragma omp parallel if (TM_TOP_LEVEL)
    {
        float *buf = malloc((size_t)(16 * K) * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            bad = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t pn = 0; pn < n; pn++) {
                if (!glu) {
                    pack_panel(qtype, w, K, N, pn * 16, out + pn * K * 8, buf);
                    continue;
                }
                pack_panel(qtype, w, K, glu, pn * 16, out + 2 * pn * K * 8, buf);                      // gate
                pack_panel(qtype, w + glu * row_bytes, K, glu, pn * 16, out + (2 * pn + 1) * K * 8, buf);  // up
            }
        }
        free(buf);
    }
    return bad ? -3 : 0;
}

int tm_qlinear_bf16_pack(int qtype, const uint8_t *w, int64_t K, int64_t N, uint32_t *out) {
    if (!pack_args_ok(qtype, K) || N < 1) return -1;
    return pack_all(qtype, w, K, N, 0, out);
}

int tm_qlinear_bf16_pack_glu(int qtype, const uint8_t *w, int64_t K, int64_t I, uint32_t *out) {
    if (!pack_args_ok(qtype, K) || I < 16 || I % 16) return -1;
    return pack_all(qtype, w, K, 2 * I, I, out);
}

// R rows of bf16 x, interleaved by k-pair (xi[p * R + r] = pair p of row r: one pointer, constant offsets), times
// the pair of panels p0, p1 (kp k-pairs) -> c[r * 32 + j] (j < 16: p0's outputs, 16 + j: p1's).
static inline __attribute__((always_inline)) void micro(const int R, const uint32_t *xi, int64_t kp,
                                                        const uint32_t *p0, const uint32_t *p1, float *c) {
    __m512 a0[BF16_MR], a1[BF16_MR];
#pragma GCC unroll 12
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; p++) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512((const void *)(p0 + p * 16));
        const __m512bh w1 = (__m512bh)_mm512_load_si512((const void *)(p1 + p * 16));
        const uint32_t *xp = xi + p * R;
#pragma GCC unroll 12
        for (int r = 0; r < R; r++) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[r]);
            a0[r] = _mm512_dpbf16_ps(a0[r], xb, w0);
            a1[r] = _mm512_dpbf16_ps(a1[r], xb, w1);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(c + r * 32, a0[r]);
        _mm512_storeu_ps(c + r * 32 + 16, a1[r]);
    }
}

#define MICRO_CASE(R_) \
    case R_: micro(R_, xi, kp, p0, p1, c); break
static void micro_rows(int R, const uint32_t *xi, int64_t kp, const uint32_t *p0, const uint32_t *p1, float *c) {
    switch (R) {
        MICRO_CASE(1); MICRO_CASE(2); MICRO_CASE(3); MICRO_CASE(4); MICRO_CASE(5); MICRO_CASE(6);
        MICRO_CASE(7); MICRO_CASE(8); MICRO_CASE(9); MICRO_CASE(10); MICRO_CASE(11); MICRO_CASE(12);
        default: break;
    }
}

// Rows of block b of a chunk of mc rows (blocks of near-equal size, at most BF16_MR rows) and its first row.
static inline int block_rows(int64_t mc, int64_t nblk, int64_t b, int64_t *r0) {
    *r0 = mc / nblk * b + (b < mc % nblk ? b : mc % nblk);
    return (int)(mc / nblk + (b < mc % nblk ? 1 : 0));
}

int tm_qlinear_bf16_panels(const uint32_t *panels, const float *x, int64_t M, int64_t K, int64_t N,
                           const float *bias, float *y, int64_t ldy, int64_t glu, float *act) {
    if (M <= 0) return 0;
    if (K <= 0 || K % QK || N < 1 || (glu && (glu % 16 || N != 2 * glu)) || (!act && ldy < N)) return -1;
    const int64_t kp = K / 2, npairs = glu ? glu / 16 : (N + 31) / 32;
    // rows per chunk: a multiple of BF16_MR whose bf16 x fits BF16_CHUNK_BYTES (at least one block)
    int64_t chunk = BF16_CHUNK_BYTES / (K * 2) / BF16_MR * BF16_MR;
    if (chunk < BF16_MR) chunk = BF16_MR;
    // x rounded to bf16 (as vcvtne2ps2bf16), each row block's rows interleaved by k-pair: block (m0, r0) of R rows
    // at word (m0 + r0) * kp, pair p of its row r at p * R + r
    uint32_t *xb = (uint32_t *)aligned_alloc(64, (size_t)(M * K * 2 + 63) & ~(size_t)63);
    if (!xb) return -1;
    const int64_t nchunks = (M + chunk - 1) / chunk, blocks_per_chunk = (chunk + BF16_MR - 1) / BF16_MR;
#pragma omp parallel for schedule(static) if (TM_TOP_LEVEL && M * K >= (1 << 16))
    for (int64_t cb = 0; cb < nchunks * blocks_per_chunk; cb++) {
        const int64_t m0 = cb / blocks_per_chunk * chunk, mc = M - m0 < chunk ? M - m0 : chunk;
        const int64_t nblk = (mc + BF16_MR - 1) / BF16_MR, b = cb % blocks_per_chunk;
        if (b >= nblk) continue;
        int64_t r0;
        const int R = block_rows(mc, nblk, b, &r0);
        uint32_t *dst = xb + (m0 + r0) * kp;
        for (int r = 0; r < R; r++) {
            const float *xr = x + (m0 + r0 + r) * K;
            for (int64_t k = 0; k < K; k += 32) {
                uint32_t w[16];
                _mm512_storeu_si512((void *)w, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + k + 16),
                                                                          _mm512_loadu_ps(xr + k)));
                for (int i = 0; i < 16; i++) dst[(k / 2 + i) * R + r] = w[i];
            }
        }
    }
#pragma omp parallel if (TM_TOP_LEVEL && npairs > 1)
    {
        float c[BF16_MR * 32];
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            const int64_t mc = M - m0 < chunk ? M - m0 : chunk;
            const int64_t nblk = (mc + BF16_MR - 1) / BF16_MR;
#pragma omp for schedule(static)
            for (int64_t pp = 0; pp < npairs; pp++) {
                const uint32_t *p0 = panels + 2 * pp * kp * 16, *p1 = p0 + kp * 16;
                const int64_t c0 = glu ? pp * 16 : pp * 32, c1 = glu ? glu + pp * 16 : pp * 32 + 16;
                const int nr0 = glu ? 16 : (int)(N - c0 < 16 ? N - c0 : 16);
                const int nr1 = glu ? 16 : (int)(N - c1 < 16 ? (N - c1 > 0 ? N - c1 : 0) : 16);
                for (int64_t b = 0; b < nblk; b++) {
                    int64_t r0;
                    const int R = block_rows(mc, nblk, b, &r0);
                    micro_rows(R, xb + (m0 + r0) * kp, kp, p0, p1, c);
                    for (int r = 0; r < R; r++) {
                        float *g = c + r * 32, *u = g + 16;
                        const int64_t row = m0 + r0 + r;
                        if (bias) {
                            for (int j = 0; j < nr0; j++) g[j] += bias[c0 + j];
                            for (int j = 0; j < nr1; j++) u[j] += bias[c1 + j];
                        }
                        if (act) {
                            tm_silu_mul_row(g, u, act + row * glu + c0, 16);
                        } else {
                            memcpy(y + row * ldy + c0, g, (size_t)nr0 * 4);
                            if (nr1) memcpy(y + row * ldy + c1, u, (size_t)nr1 * 4);
                        }
                    }
                }
            }
        }
    }
    free(xb);
    return 0;
}
#else
int tm_qlinear_bf16_available(void) { return 0; }
int tm_qlinear_bf16_pack(int qtype, const uint8_t *w, int64_t K, int64_t N, uint32_t *out) {
    (void)qtype; (void)w; (void)K; (void)N; (void)out;
    return -2;  // built without AVX512-BF16
}
int tm_qlinear_bf16_pack_glu(int qtype, const uint8_t *w, int64_t K, int64_t I, uint32_t *out) {
    (void)qtype; (void)w; (void)K; (void)I; (void)out;
    return -2;
}
int tm_qlinear_bf16_panels(const uint32_t *panels, const float *x, int64_t M, int64_t K, int64_t N,
                           const float *bias, float *y, int64_t ldy, int64_t glu, float *act) {
    (void)panels; (void)x; (void)M; (void)K; (void)N; (void)bias; (void)y; (void)ldy; (void)glu; (void)act;
    return -2;
}
#endif
