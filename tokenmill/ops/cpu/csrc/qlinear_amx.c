// y[M,N] = x[M,K] @ W[N,K]^T (+ bias) on Intel AMX (bf16 tiles), W kept as packed GGUF blocks.
//
// Called by qlinear_f32 (qlinear.c); compiled only where the compiler targets AMX-TILE + AMX-BF16 + AVX512-BF16
// (-march=native on Sapphire Rapids and later: TM_AMX, quant.h), and used only after tm_amx_init() has obtained the
// kernel's permission for tile
// data (Linux arch_prctl). Numerics: each weight is dequantized exactly as dequant_row does, then rounded to bf16
// (round to nearest even); activations are rounded to bf16; products are summed in float32 by the tile unit.
// That is what the dense bf16 copy (`gemm_dtype` bfloat16) computes, without keeping the copy or reading it.
//
// The tile unit computes C[16 x 16] += A[16 x 32] . B[32 x 16] (bf16 pairs). A = 16 tokens x 32 k of x (bf16,
// x's own layout); B = one block of 16 output rows in pair ("VNNI") layout, 16 k-pairs x 16 outputs x 2, made by
// dequantizing the 16 blocks and transposing them as 16 x 16 words; C = 16 tokens x 16 outputs, stored straight
// into y. Work: OpenMP over pairs of panels (32 output rows), each dequantized once per call into a buffer (2 x 48
// KiB at K = 1536, L2-resident), then every 32 tokens run over it with 2 x 2 accumulator tiles. The weight stream
// (4.5-8.5 bits a weight, prefetched ahead) is read once per call, whatever M is.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"

#if defined(TM_AMX)
#include "amx.h"

#ifndef AMX_MAX_M
#define AMX_MAX_M 512  // rows of x per pass
#endif

static int amx_ready = 0;  // set once by tm_amx_init (process-wide capability, not configuration)

// Asks Linux for the AMX tile-data state (needed once per process before any tile instruction). 1: usable.
int tm_amx_init(void) {
    if (!amx_ready) amx_ready = tm_amx_request_tiles();
    return amx_ready;
}

int tm_amx_enabled(void) { return amx_ready; }

// Tiles: 0-3 accumulators C[i][j] (16 tokens x 16 outputs, f32) for token blocks i and output panels j in {0, 1};
// 4-5: A, x rows (16 tokens x 32 k, bf16); 6-7: B, one k-block of a panel in pair layout (16 k-pairs x 16 x 2).
static void amx_config(void) {
    static const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 16};
    static const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    tm_amx_load_tiles(rows, colsb);
}

static inline int kquant(int qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K; }

// Block b (weights 32b .. 32b + 31) of a packed row as 16 words, each a pair of bf16 (k = 2i, 2i + 1), dequantized
// as dequant_row (generic types: sub-block b % nsub of super-block b / nsub; the k-quants' scales from ks, its
// super-block's kquant_scales: d at ks[0..15], mins at ks[16..23]).
static inline __attribute__((always_inline)) __m512i block_pairs(const int qtype, const uint8_t *row, int64_t b,
                                                                 const float *ks) {
    __m512 q0, q1;
    if (generic_type(qtype)) {
        const int nsub = block_weights(qtype) / QK, s = (int)(b % nsub);
        const uint8_t *blk = row + (b / nsub) * block_bytes(qtype);
        float dlo, dhi, m;
        if (qtype == Q6_K) {
            dlo = ks[2 * s];
            dhi = ks[2 * s + 1];
            m = 0.0f;
        } else if (kquant(qtype)) {
            dlo = dhi = ks[s];
            m = ks[16 + s];
        } else {
            gen_sub_scales(qtype, blk, s, &dlo, &dhi, &m);
        }
        const __m256i q = gen_sub_q256(qtype, blk, s);
        const __m512 mv = _mm512_set1_ps(m);
        q0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), _mm512_set1_ps(dlo),
                             mv);
        q1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))),
                             _mm512_set1_ps(dhi), mv);
        return (__m512i)_mm512_cvtne2ps_pbh(q1, q0);
    }
    float d, m;
    block512(qtype, row + b * block_bytes(qtype), &q0, &q1, &d, &m);
    const __m512 dv = _mm512_set1_ps(d);
    if (qtype == Q4_1) {
        const __m512 mv = _mm512_set1_ps(m);
        q0 = _mm512_fmadd_ps(q0, dv, mv);
        q1 = _mm512_fmadd_ps(q1, dv, mv);
    } else {
        if (qtype == Q4_0) {  // d * (q - 8)
            const __m512 eight = _mm512_set1_ps(8.0f);
            q0 = _mm512_sub_ps(q0, eight);
            q1 = _mm512_sub_ps(q1, eight);
        }
        q0 = _mm512_mul_ps(q0, dv);
        q1 = _mm512_mul_ps(q1, dv);
    }
    // cvtne2ps gives [bf16(q0[0..15]), bf16(q1[0..15])] = k 0..31 in order; word i holds k = 2i, 2i + 1
    return (__m512i)_mm512_cvtne2ps_pbh(q1, q0);
}

// Dequantizes output rows n0 .. n0+15 (rows >= N are zero) into pair layout: panel[b][p][j] = word p of row
// n0 + j's block b, i.e. the B tile of k-block b.
static inline __attribute__((always_inline)) void panel_pairs(const int qtype, const uint8_t *w, int64_t row_bytes,
                                                              int64_t nkb, int64_t n0, int64_t N, uint32_t *panel) {
    const int nr = (int)(N - n0 < 16 ? N - n0 : 16), nsub = block_weights(qtype) / QK;
    float ks[16][24];  // k-quants: each row's scales of the current super-block, decoded once for its 8 blocks
    for (int64_t b = 0; b < nkb; b++) {
        __m512i v[16];
        if (kquant(qtype) && b % nsub == 0)
            for (int j = 0; j < nr; j++)
                kquant_scales(qtype, w + (n0 + j) * row_bytes + (b / nsub) * block_bytes(qtype), ks[j], ks[j] + 16);
        for (int j = 0; j < 16; j++) {
            if (j < nr) {
                const uint8_t *row = w + (n0 + j) * row_bytes;
                _mm_prefetch((const char *)row + (b + 8) * row_bytes / nkb, _MM_HINT_T0);  // 8 blocks ahead
                v[j] = block_pairs(qtype, row, b, ks[j]);
            } else {
                v[j] = _mm512_setzero_si512();
            }
        }
        tm_transpose16(v);
        for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(panel + (b * 16 + p) * 16), v[p]);
    }
}

#define AMX_STORE(T, I, J)                                                                                        \
    do {                                                                                                          \
        float *dst_ = y + (m0 + 16 * (I)) * ldy + ((J) ? c1 : c0);                                                 \
        if (ms[I] == 16 && nr[J] == 16) _tile_stored(T, dst_, ldy * 4);                                           \
        else {                                                                                                    \
            _tile_stored(T, cb, 64);                                                                              \
            for (int t = 0; t < ms[I]; t++) memcpy(dst_ + t * ldy, cb + t * 16, (size_t)nr[J] * 4);                \
        }                                                                                                         \
    } while (0)

// GLU output: tiles TG (gate) and TU (up) of token block I -> act[t, c0 + j] = silu(g + bias) * (u + bias) by
// simd.h's tm_silu_mul_row, the function layer.c's silu pass runs (the same values), I a multiple of 16.
#define AMX_GLU(TG, TU, I)                                                                                        \
    do {                                                                                                          \
        _tile_stored(TG, cb, 64);                                                                                 \
        _tile_stored(TU, cu, 64);                                                                                 \
        for (int t = 0; t < ms[I]; t++) {                                                                         \
            float *g_ = cb + t * 16, *u_ = cu + t * 16;                                                           \
            if (bias)                                                                                             \
                for (int j = 0; j < 16; j++) { g_[j] += bias[c0 + j]; u_[j] += bias[c1 + j]; }                    \
            tm_silu_mul_row(g_, u_, act + (m0 + 16 * (I) + t) * glu + c0, 16);                                     \
        }                                                                                                         \
    } while (0)

// The two panels of a pair for a compile-time type (a case of the dispatch below).
#define PANELS(QT)                                                                   \
    case QT:                                                                         \
        panel_pairs(QT, w, row_bytes, nkb, n0, N, p0);                               \
        if (nr[1]) panel_pairs(QT, w, row_bytes, nkb, n0 + 16, N, p1);               \
        break

// With `packed` (tm_qlinear_amx_pack's panels of W) the tiles read the panels; otherwise each call dequantizes
// W's panels as it goes. glu > 0: the panels are tm_qlinear_amx_pack_glu's (W = [gate (glu rows); up (glu rows)],
// pair p = gate rows 16p.. and up rows 16p..): y gets the usual [gate | up] columns, or with `act` (y unused)
// act[M, glu] = silu(gate) * up. Returns 0, -1 out of memory. K % block_weights(qtype) == 0 (checked by the caller).
// x16 (NULL: none): x already in bf16, rows xs16 elements apart, readable up to the next multiple of 16 rows (the
// values of rows past M do not matter: they only reach the tiles' rows that are never stored); x is then unused.
static int amx_gemm(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                    float *y, int64_t ldy, const uint32_t *packed, int64_t glu, float *act, const uint16_t *x16,
                    int64_t xs16) {
    if (M > AMX_MAX_M) {  // keep x (bf16) L2-resident: a long prefill runs in row chunks (weights dequantized again)
        for (int64_t m = 0; m < M; m += AMX_MAX_M) {
            const int64_t mm = M - m < AMX_MAX_M ? M - m : AMX_MAX_M;
            const int rc = amx_gemm(qtype, x16 ? x : x + m * K, mm, K, w, N, bias, y ? y + m * ldy : NULL, ldy, packed,
                                    glu, act ? act + m * glu : NULL, x16 ? x16 + m * xs16 : NULL, xs16);
            if (rc) return rc;
        }
        return 0;
    }
    const int64_t nkb = K / QK, row_bytes = glu ? 0 : K / block_weights(qtype) * block_bytes(qtype);
    const int64_t mpad = (M + 15) / 16 * 16, npairs = glu ? glu / 16 : (N + 31) / 32;  // panel pairs: 32 outputs
    // x in bf16, rows padded to a multiple of 16 with zeros (A tiles: 16 rows x 64 bytes, stride K * 2)
    const int64_t XS = x16 ? xs16 : K;
    uint16_t *xb = x16 ? NULL : (uint16_t *)aligned_alloc(64, (size_t)(mpad * K * 2 + 63) & ~(size_t)63);
    if (!x16 && !xb) return -1;
#pragma omp parallel for schedule(static) if (TM_TOP_LEVEL && M * K >= (1 << 16))
    for (int64_t m = 0; m < (x16 ? 0 : mpad); m++) {
        uint16_t *dst = xb + m * K;
        if (m >= M) {
            memset(dst, 0, (size_t)K * 2);
            continue;
        }
        for (int64_t k = 0; k < K; k += 32)
            _mm512_storeu_si512((void *)(dst + k), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + m * K + k + 16),
                                                                               _mm512_loadu_ps(x + m * K + k)));
    }
    int rc = 0;
#pragma omp parallel if (TM_TOP_LEVEL)
    {
        // two panels in pair layout ([k-block][16 pairs][16 outputs] words each) and a 16 x 16 float scratch tile
        uint32_t *panel = packed ? NULL  // the tiles are read from the packed panels
                                 : (uint32_t *)aligned_alloc(64, (size_t)(2 * nkb * 256 * 4 + 64) & ~(size_t)63);
        float *cb = (float *)aligned_alloc(64, 512 * sizeof(float)), *cu = cb ? cb + 256 : NULL;
        if ((!packed && !panel) || !cb) {
#pragma omp atomic write
            rc = -1;
        } else {
            amx_config();
            uint32_t *p0 = panel, *p1 = panel ? panel + nkb * 256 : NULL;
#pragma omp for schedule(static)
            for (int64_t pp = 0; pp < npairs; pp++) {
                const int64_t n0 = pp * 32;
                int nr[2];
                nr[0] = (int)(N - n0 < 16 ? N - n0 : 16);
                nr[1] = (int)(N - n0 - 16 < 16 ? (N - n0 - 16 > 0 ? N - n0 - 16 : 0) : 16);
                // the output columns of the pair's two panels
                const int64_t c0 = glu ? pp * 16 : n0, c1 = glu ? glu + pp * 16 : n0 + 16;
                if (glu) nr[0] = nr[1] = 16;
                if (packed) {
                    p0 = (uint32_t *)packed + 2 * pp * nkb * 256;
                    p1 = p0 + nkb * 256;
                } else
                    switch (qtype) {
                        PANELS(Q4_0); PANELS(Q4_1); PANELS(Q8_0); PANELS(Q5_0); PANELS(Q5_1); PANELS(Q4_K); PANELS(Q5_K);
                        PANELS(Q6_K); PANELS(BF16); PANELS(F16);
                        default: break;
                    }
                for (int64_t m0 = 0; m0 < M; m0 += 32) {
                    int ms[2];
                    ms[0] = (int)(M - m0 < 16 ? M - m0 : 16);
                    ms[1] = (int)(M - m0 - 16 < 16 ? (M - m0 - 16 > 0 ? M - m0 - 16 : 0) : 16);
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    const uint16_t *xa = (x16 ? x16 : xb) + m0 * XS;
                    for (int64_t b = 0; b < nkb; b++) {
                        _tile_loadd(4, xa + b * 32, XS * 2);
                        _tile_loadd(6, p0 + b * 256, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        if (nr[1]) {
                            _tile_loadd(7, p1 + b * 256, 64);
                            _tile_dpbf16ps(1, 4, 7);
                        }
                        if (ms[1]) {
                            _tile_loadd(5, xa + 16 * XS + b * 32, XS * 2);
                            _tile_dpbf16ps(2, 5, 6);
                            if (nr[1]) _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    if (act) {
                        AMX_GLU(0, 1, 0);
                        if (ms[1]) AMX_GLU(2, 3, 1);
                        continue;
                    }
                    AMX_STORE(0, 0, 0);
                    if (nr[1]) AMX_STORE(1, 0, 1);
                    if (ms[1]) AMX_STORE(2, 1, 0);
                    if (ms[1] && nr[1]) AMX_STORE(3, 1, 1);
                    if (bias) {
                        for (int t = 0; t < ms[0] + ms[1]; t++) {
                            float *yr = y + (m0 + t) * ldy;
                            for (int j = 0; j < nr[0]; j++) yr[c0 + j] += bias[c0 + j];
                            for (int j = 0; j < nr[1]; j++) yr[c1 + j] += bias[c1 + j];
                        }
                    }
                }
            }
            _tile_release();
        }
        free(panel);
        free(cb);
    }
    free(xb);
    return rc;
}

int tm_qlinear_amx(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                   float *y, int64_t ldy) {
    return amx_gemm(qtype, x, M, K, w, N, bias, y, ldy, NULL, 0, NULL, NULL, 0);
}

int tm_qlinear_amx_bf16x(int qtype, const uint16_t *x16, int64_t xs16, int64_t M, int64_t K, const uint8_t *w,
                         int64_t N, float *y, int64_t ldy) {
    const int bb = block_bytes(qtype);
    if (bb == 0 || K % block_weights(qtype) != 0 || M < 0 || N < 0 || ldy < N || xs16 < K) return -1;
    return amx_gemm(qtype, NULL, M, K, w, N, NULL, y, ldy, NULL, 0, NULL, x16, xs16);
}

void tm_x_to_bf16(const float *x, int64_t M, int64_t K, uint16_t *out, int64_t ldo) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 32)
            _mm512_storeu_si512((void *)(out + m * ldo + k),
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + m * K + k + 16),
                                                             _mm512_loadu_ps(x + m * K + k)));
}

int tm_qlinear_amx_panels(const uint32_t *panels, const float *x, int64_t M, int64_t K, int64_t N, const float *bias,
                          float *y, int64_t ldy, int64_t glu) {
    if (glu && (glu % 16 || N != 2 * glu)) return -1;
    return amx_gemm(-1, x, M, K, NULL, N, bias, y, ldy, panels, glu, NULL, NULL, 0);
}

int tm_qlinear_amx_glu(const uint32_t *panels, const float *x, int64_t M, int64_t K, int64_t I, const float *bias,
                       float *act) {
    if (I <= 0 || I % 16) return -1;
    return amx_gemm(-1, x, M, K, NULL, 2 * I, bias, NULL, 0, panels, I, act, NULL, 0);
}

#define PACK(QT)                                                                                     \
    case QT:                                                                                         \
        for (int64_t pn = 0; pn < npanels; pn++) panel_pairs(QT, w, row_bytes, nkb, pn * 16, N, out + pn * nkb * 256); \
        break

// W's panels as amx_gemm dequantizes them (the same bf16 words), once: ceil(N / 32) * 2 panels of nkb * 256 words
// (rows past N zero), tm_qlinear_amx_panel_words(K, N) words in all. Returns 0, -1 bad arguments.
int tm_qlinear_amx_pack(int qtype, const uint8_t *w, int64_t K, int64_t N, uint32_t *out) {
    const int bb = block_bytes(qtype);
    if (bb == 0 || K % block_weights(qtype) != 0 || N < 1) return -1;
    const int64_t nkb = K / QK, row_bytes = K / block_weights(qtype) * bb, npanels = (N + 31) / 32 * 2;
    switch (qtype) {
        PACK(Q4_0); PACK(Q4_1); PACK(Q8_0); PACK(Q5_0); PACK(Q5_1); PACK(Q4_K); PACK(Q5_K); PACK(Q6_K);
        PACK(BF16); PACK(F16);
        default: return -1;
    }
    return 0;
}
// The panels of a gate|up weight W [2I, K] for the GLU epilogue (amx_gemm's glu): pair p holds gate rows 16p ..
// 16p + 15, then up rows 16p .., so one pair's accumulators meet a gate and its up. I a multiple of 16; as many
// words as tm_qlinear_amx_panel_words(K, 2I). Returns 0, -1 bad arguments.
int tm_qlinear_amx_pack_glu(int qtype, const uint8_t *w, int64_t K, int64_t I, uint32_t *out) {
    const int bb = block_bytes(qtype);
    if (bb == 0 || K % block_weights(qtype) != 0 || I < 16 || I % 16) return -1;
    const int64_t nkb = K / QK, row_bytes = K / block_weights(qtype) * bb, N = I;
    for (int half = 0; half < 2; half++) {
        const uint8_t *wh = w + half * I * row_bytes;
        uint32_t *o = out + half * nkb * 256;
#define PACK_GLU(QT)                                                                                               \
    case QT:                                                                                                       \
        for (int64_t pn = 0; pn < I / 16; pn++) panel_pairs(QT, wh, row_bytes, nkb, pn * 16, N, o + 2 * pn * nkb * 256); \
        break
        switch (qtype) {
            PACK_GLU(Q4_0); PACK_GLU(Q4_1); PACK_GLU(Q8_0); PACK_GLU(Q5_0); PACK_GLU(Q5_1); PACK_GLU(Q4_K);
            PACK_GLU(Q5_K); PACK_GLU(Q6_K); PACK_GLU(BF16); PACK_GLU(F16);
            default: return -1;
        }
#undef PACK_GLU
    }
    return 0;
}
#else
int tm_amx_init(void) { return 0; }
int tm_qlinear_amx_pack(int qtype, const uint8_t *w, int64_t K, int64_t N, uint32_t *out) {
    (void)qtype; (void)w; (void)K; (void)N; (void)out;
    return -2;  // built without the AMX path
}
int tm_qlinear_amx_pack_glu(int qtype, const uint8_t *w, int64_t K, int64_t I, uint32_t *out) {
    (void)qtype; (void)w; (void)K; (void)I; (void)out;
    return -2;
}
#endif

int64_t tm_qlinear_amx_panel_words(int64_t K, int64_t N) { return (N + 31) / 32 * 2 * (K / 32) * 256; }
