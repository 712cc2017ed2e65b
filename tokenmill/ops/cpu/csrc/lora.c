// Batched LoRA inside the fused decoder layer (layer.c): after a packed projection y = x W^T, each adapter's
// rows get y += (x A) B, A = a[slot] [in, K], B = b[slot] [K, out] (tokenmill/lora/runtime.py's stacked slot
// buffers: rank padded with zeros, B block-diagonal over the packed slices, scaling folded in). The step's rows
// come ordered by adapter, so each adapter is one contiguous row span (start, len, slot); rows outside every
// span are the base model's. The reference is tokenmill/ops/lora/reference.py (the per-op path's op).
//
// Two kernels. float32 (A, B as given, one row at a time): the engine's float32 GEMM setting. bfloat16 (when the
// runtime passes a16 / b16, i.e. the packed linears' large calls run in bfloat16 on AMX): each adapter span is cut
// in blocks (SGMV-style segments: the adapter's A and B are read once per block, not once per row) of 16 rows on
// the AMX tile unit, the rest in blocks of up to 4 rows with AVX512-BF16. x is rounded to bfloat16, h = x A sums in
// float32 (vdpbf16ps / tdpbf16ps: pairs of inputs), is rounded to bfloat16, and y += h B sums into the float32
// output (the AVX-512 blocks hold 64 columns in registers). Packed layouts (runtime.py _Projection.pack_bf16), per
// slot, with in2 = in rounded up to 32, Kp = K rounded up to 16, r2 = the slice rank K / nslices rounded up to even,
// padding zero:
//   a16 [in2 / 2][Kp][2]          element (i, k) at ((i / 2) * Kp + k) * 2 + i % 2
//   b16 slice s (ncols = cols[s+1] - cols[s] columns, n16 = ncols rounded up to 16), at r2 times the n16 of the
//       slices before it: [n16 / 16][r2 / 2][16][2], element (k, o) of the slice's rank row k, column o at
//       (((o / 16) * (r2 / 2) + k / 2) * 16 + o % 16) * 2 + k % 2: 16 columns' rank pairs contiguous, so the
//       expand reads B in order (and one AMX tile is 512 contiguous bytes at rank 16)
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"
#include "simd.h"

#ifdef TM_AVX512
// One row with AVX-512, for K % 16 == 0 and K <= 64: h = x A kept in (up to) 4 registers, then y += h B
// 64 columns at a time with the columns in registers (y is read and written once, not once per rank).
static void expand_avx512(const float *hs, const float *B, int64_t k0, int64_t k1, float *yr, int64_t o0,
                          int64_t o1, int64_t out) {
    int64_t o = o0;
    for (; o + 64 <= o1; o += 64) {
        __m512 y0 = _mm512_loadu_ps(yr + o), y1 = _mm512_loadu_ps(yr + o + 16);
        __m512 y2 = _mm512_loadu_ps(yr + o + 32), y3 = _mm512_loadu_ps(yr + o + 48);
        for (int64_t k = k0; k < k1; k++) {
            if (hs[k] == 0.0f) continue;  // a zero-padded rank
            const __m512 hv = _mm512_set1_ps(hs[k]);
            const float *bk = B + k * out + o;
            y0 = _mm512_fmadd_ps(hv, _mm512_loadu_ps(bk), y0);
            y1 = _mm512_fmadd_ps(hv, _mm512_loadu_ps(bk + 16), y1);
            y2 = _mm512_fmadd_ps(hv, _mm512_loadu_ps(bk + 32), y2);
            y3 = _mm512_fmadd_ps(hv, _mm512_loadu_ps(bk + 48), y3);
        }
        _mm512_storeu_ps(yr + o, y0);
        _mm512_storeu_ps(yr + o + 16, y1);
        _mm512_storeu_ps(yr + o + 32, y2);
        _mm512_storeu_ps(yr + o + 48, y3);
    }
    for (; o < o1; o++) {
        float a = yr[o];
        for (int64_t k = k0; k < k1; k++) a += hs[k] * B[k * out + o];
        yr[o] = a;
    }
}

// cols: nslices + 1 column offsets of a block-diagonal B (slice s: rank rows s*K/nslices.., its columns only);
// nslices 0: B dense.
static void lora_row_avx512(const float *xr, const float *A, const float *B, int64_t in, int64_t K, float *yr,
                            int64_t out, int64_t nslices, const int64_t *cols) {
    const int nk = (int)(K / 16);
    __m512 h[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < in; i++) {
        const __m512 xv = _mm512_set1_ps(xr[i]);
        const float *ar = A + i * K;
        for (int c = 0; c < nk; c++) h[c] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(ar + 16 * c), h[c]);
    }
    float hs[64];
    for (int c = 0; c < nk; c++) _mm512_storeu_ps(hs + 16 * c, h[c]);
    if (nslices > 0 && cols && K % nslices == 0 && cols[nslices] == out) {
        const int64_t r = K / nslices;
        for (int64_t sl = 0; sl < nslices; sl++) expand_avx512(hs, B, sl * r, (sl + 1) * r, yr, cols[sl], cols[sl + 1], out);
    } else {
        expand_avx512(hs, B, 0, K, yr, 0, out, out);
    }
}
#endif

#if defined(TM_AVX512) && defined(__AVX512BF16__)
#define TM_LORA_BF16 1
#define LORA_RB 4     // rows per block of the bfloat16 kernel
#define LORA_PF 1024  // prefetch distance in A (bfloat16 elements: 2 KiB ahead); B: the next columns' same line

static inline __m512bh bcast_pair(const uint16_t *p) {  // the bfloat16 pair p[0], p[1] in every lane
    int32_t w;
    memcpy(&w, p, 4);
    return (__m512bh)_mm512_set1_epi32(w);
}

// rows [R][n] of float32 (stride xs) -> bfloat16 [R][n2] (n2 >= n, the pad zero)
static void rows_to_bf16(const float *x, int64_t xs, int R, int64_t n, uint16_t *xb, int64_t n2) {
    for (int r = 0; r < R; r++) {
        const float *xr = x + r * xs;
        uint16_t *d = xb + r * n2;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)(d + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + i)));
        if (i < n) {
            const __mmask16 mk = (__mmask16)((1u << (n - i)) - 1);
            _mm256_mask_storeu_epi16(d + i, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, xr + i)));
        }
        for (int64_t j = n; j < n2; j++) d[j] = 0;
    }
}

// hs [R][Kp] = xb [R][in2] A (a16 layout), NK = Kp / 16 vectors per row
static inline __attribute__((always_inline)) void shrink_bf16(const uint16_t *xb, int64_t in2, const uint16_t *A,
                                                              int64_t Kp, float *hs, const int R, const int NK) {
    __m512 acc[LORA_RB][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NK; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t ip = 0; ip < in2 / 2; ip++) {
        const uint16_t *ap = A + ip * Kp * 2;
        __m512bh av[4];
        for (int c = 0; c < NK; c++) {
            av[c] = (__m512bh)_mm512_loadu_si512(ap + 32 * c);
            _mm_prefetch((const char *)(ap + 32 * c + LORA_PF), _MM_HINT_T0);
        }
        for (int r = 0; r < R; r++) {
            const __m512bh xv = bcast_pair(xb + r * in2 + 2 * ip);
            for (int c = 0; c < NK; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av[c], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NK; c++) _mm512_storeu_ps(hs + r * Kp + 16 * c, acc[r][c]);
}

// y [R rows, stride ys] columns [o, o + 16 NV) += hb [R][hstride] (its np pairs) B (a b16 slice), o % 16 == 0
static inline __attribute__((always_inline)) void expand_bf16(const uint16_t *hb, int64_t hstride, const uint16_t *Bs,
                                                              int64_t np, float *y, int64_t ys, int64_t o,
                                                              const int R, const int NV) {
    __m512 acc[LORA_RB][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_loadu_ps(y + r * ys + o + 16 * v);
    for (int64_t kp = 0; kp < np; kp++) {
        const uint16_t *bp = Bs + ((o / 16) * np + kp) * 32;
        __m512bh bv[4];
        for (int v = 0; v < NV; v++) {
            bv[v] = (__m512bh)_mm512_loadu_si512(bp + v * np * 32);
            _mm_prefetch((const char *)(bp + (v + NV) * np * 32), _MM_HINT_T0);  // the next columns' line
        }
        for (int r = 0; r < R; r++) {
            const __m512bh hv = bcast_pair(hb + r * hstride + 2 * kp);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], bv[v], hv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(y + r * ys + o + 16 * v, acc[r][v]);
}

// the last (< 16) columns [o, ncols) of a slice, masked
static void expand_tail_bf16(const uint16_t *hb, int64_t hstride, const uint16_t *Bs, int64_t ncols, int64_t np,
                             float *y, int64_t ys, int64_t o, int R) {
    const __mmask16 mk = (__mmask16)((1u << (ncols - o)) - 1);
    for (int r = 0; r < R; r++) {
        __m512 acc = _mm512_maskz_loadu_ps(mk, y + r * ys + o);
        for (int64_t kp = 0; kp < np; kp++) {
            const __m512bh bv = (__m512bh)_mm512_loadu_si512(Bs + ((o / 16) * np + kp) * 32);  // zero padded
            acc = _mm512_dpbf16_ps(acc, bv, bcast_pair(hb + r * hstride + 2 * kp));
        }
        _mm512_mask_storeu_ps(y + r * ys + o, mk, acc);
    }
}

#define SHRINK_CASE(R_, NK_) case (R_) * 8 + (NK_): shrink_bf16(xb, in2, A, Kp, hs, R_, NK_); break;
#define EXPAND_ROWS(R_)                                                                            \
    case R_:                                                                                       \
        for (; o + 64 <= nc; o += 64) expand_bf16(hb + k0, hst, Bs, np, yb + c0, out, o, R_, 4); \
        for (; o + 16 <= nc; o += 16) expand_bf16(hb + k0, hst, Bs, np, yb + c0, out, o, R_, 1); \
        break;

// one block: rows x [R][in] (stride in), y [R][out] (stride out), of one adapter (its packed A16, B16)
static void lora_block_bf16(const tm_lora_proj *P, const uint16_t *A, const uint16_t *B, const float *x,
                            int64_t in, float *yb, int64_t out, int R, uint16_t *xb) {
    const int64_t K = P->k, Kp = (K + 15) & ~(int64_t)15, in2 = (in + 31) & ~(int64_t)31, ns = P->nslices;
    const int64_t rk = K / ns, r2 = (rk + 1) & ~(int64_t)1, np = r2 / 2, hst = Kp + 2;
    float hs[LORA_RB * 64];
    uint16_t hb[LORA_RB * (64 + 2)];
    rows_to_bf16(x, in, R, in, xb, in2);
    switch (R * 8 + (int)(Kp / 16)) {
        SHRINK_CASE(1, 1) SHRINK_CASE(1, 2) SHRINK_CASE(1, 3) SHRINK_CASE(1, 4)
        SHRINK_CASE(2, 1) SHRINK_CASE(2, 2) SHRINK_CASE(2, 3) SHRINK_CASE(2, 4)
        SHRINK_CASE(3, 1) SHRINK_CASE(3, 2) SHRINK_CASE(3, 3) SHRINK_CASE(3, 4)
        SHRINK_CASE(4, 1) SHRINK_CASE(4, 2) SHRINK_CASE(4, 3) SHRINK_CASE(4, 4)
        default: return;
    }
    rows_to_bf16(hs, Kp, R, Kp, hb, hst);  // hst = Kp + 2: the pad pair of a slice of odd rank reads zeros
    for (int r = 0; r < R; r++) hb[r * hst + Kp] = hb[r * hst + Kp + 1] = 0;
    const uint16_t *Bs = B;
    for (int64_t s = 0; s < ns; Bs += r2 * ((P->cols[s + 1] - P->cols[s] + 15) & ~(int64_t)15), s++) {
        const int64_t c0 = P->cols[s], nc = P->cols[s + 1] - c0, k0 = s * rk;
        int64_t o = 0;
        switch (R) {
            EXPAND_ROWS(1)
            EXPAND_ROWS(2)
            EXPAND_ROWS(3)
            EXPAND_ROWS(4)
        }
        if (o < nc) expand_tail_bf16(hb + k0, hst, Bs, nc, np, yb + c0, out, o, R);
    }
}

#ifdef TM_AMX
#include "amx.h"

// Tiles: 0-3 float32 accumulators (16 rows x 16), 4 x (16 rows x 32 inputs), 5 a16 (16 input pairs x 16 k x 2),
// 6 h (16 rows x r2 ranks), 7 16 columns of a b16 slice (r2 / 2 rank pairs x 16 columns x 2).
static void lora_amx_config(int64_t r2) {
    const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, (uint8_t)(r2 / 2)};
    const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, (uint16_t)(r2 * 2), 64};
    tm_amx_load_tiles(rows, colsb);
}

// one block of 16 rows on the tile unit (the same products and float32 sums as lora_block_bf16)
static void lora_block_amx(const tm_lora_proj *P, const uint16_t *A, const uint16_t *B, const float *x, int64_t in,
                           float *yb, int64_t out, uint16_t *xb) {
    const int64_t K = P->k, Kp = (K + 15) & ~(int64_t)15, in2 = (in + 31) & ~(int64_t)31, ns = P->nslices;
    const int64_t rk = K / ns, r2 = (rk + 1) & ~(int64_t)1, np = r2 / 2, hst = Kp + 2;
    const int nk = (int)(Kp / 16);
    float hs[16 * 64];
    uint16_t hb[16 * (64 + 2)];
    rows_to_bf16(x, in, 16, in, xb, in2);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ib = 0; ib < in2 / 32; ib++) {
        _tile_loadd(4, xb + ib * 32, in2 * 2);
        const uint16_t *ab = A + ib * 16 * Kp * 2;
        _tile_loadd(5, ab, Kp * 4);
        _tile_dpbf16ps(0, 4, 5);
        if (nk > 1) { _tile_loadd(5, ab + 32, Kp * 4); _tile_dpbf16ps(1, 4, 5); }
        if (nk > 2) { _tile_loadd(5, ab + 64, Kp * 4); _tile_dpbf16ps(2, 4, 5); }
        if (nk > 3) { _tile_loadd(5, ab + 96, Kp * 4); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, hs, Kp * 4);
    if (nk > 1) _tile_stored(1, hs + 16, Kp * 4);
    if (nk > 2) _tile_stored(2, hs + 32, Kp * 4);
    if (nk > 3) _tile_stored(3, hs + 48, Kp * 4);
    rows_to_bf16(hs, Kp, 16, Kp, hb, hst);
    const uint16_t *Bs = B;
    for (int64_t s = 0; s < ns; Bs += r2 * ((P->cols[s + 1] - P->cols[s] + 15) & ~(int64_t)15), s++) {
        const int64_t c0 = P->cols[s], nc = P->cols[s + 1] - c0, k0 = s * rk;
        float *ys = yb + c0;
        _tile_loadd(6, hb + k0, hst * 2);
        int64_t o = 0;
        for (; o + 16 <= nc; o += 16) {
            _tile_loadd(0, ys + o, out * 4);
            _tile_loadd(7, Bs + (o / 16) * np * 32, 64);
            _tile_dpbf16ps(0, 6, 7);
            _tile_stored(0, ys + o, out * 4);
        }
        if (o < nc) expand_tail_bf16(hb + k0, hst, Bs, nc, np, ys, out, o, 16);
    }
}
#endif

// the spans' rows (lo[g], n[g] rows each, already clipped, relative to x's row 0): blocks of 16 rows on the tile
// unit where AMX is usable, the rest in blocks of up to 4 rows
static int lora_apply_bf16(const tm_lora *L, const tm_lora_proj *P, const float *x, int64_t in, float *y,
                           int64_t out, const int64_t *lo, const int64_t *n, int64_t G, int64_t total) {
    const int64_t K = P->k, Kp = (K + 15) & ~(int64_t)15, in2 = (in + 31) & ~(int64_t)31;
    const int64_t r2 = ((K / P->nslices) + 1) & ~(int64_t)1;
    int64_t out16 = 0;  // the slices' columns, each rounded up to 16: a slot's b16 holds r2 * out16
    for (int64_t s = 0; s < P->nslices; s++) out16 += (P->cols[s + 1] - P->cols[s] + 15) & ~(int64_t)15;
    const int par = TM_TOP_LEVEL && total * K * (in + out) >= (1 << 17);
    int amx = 0;
#ifdef TM_AMX
    amx = tm_amx_enabled() && r2 <= 32;
#endif
    // blocks: (row, rows); a step with fewer blocks than threads goes row by row (each thread reads its adapter's
    // A and B, as the float32 kernel does)
    int64_t rb = LORA_RB, nblk = 0;
    for (int64_t g = 0; g < G; g++) nblk += amx ? n[g] / 16 + (n[g] % 16 + rb - 1) / rb : (n[g] + rb - 1) / rb;
    if (par && nblk < omp_get_max_threads()) rb = 1;
    int64_t *blk = (int64_t *)malloc((size_t)(3 * total + 3) * sizeof(int64_t));  // row, rows, slot per block
    if (!blk) return -1;
    nblk = 0;
    for (int64_t g = 0; g < G; g++) {
        int64_t r = lo[g];
        const int64_t e = lo[g] + n[g];
        for (; amx && r + 16 <= e; r += 16)
            blk[3 * nblk] = r, blk[3 * nblk + 1] = 16, blk[3 * nblk++ + 2] = L->slots[g];
        for (; r < e; r += rb)
            blk[3 * nblk] = r, blk[3 * nblk + 1] = e - r < rb ? e - r : rb, blk[3 * nblk++ + 2] = L->slots[g];
    }
    int failed = 0;
#pragma omp parallel if (par)
    {
        uint16_t *xb = (uint16_t *)malloc((size_t)(16 * in2) * sizeof(uint16_t));
        if (!xb) {
#pragma omp atomic write
            failed = 1;
        }
#ifdef TM_AMX
        if (amx && xb) lora_amx_config(r2);
#endif
#pragma omp for schedule(static)
        for (int64_t j = 0; j < nblk; j++) {
            if (!xb) continue;  // out of memory: reported below
            const int64_t row = blk[3 * j], R = blk[3 * j + 1], slot = blk[3 * j + 2];
            const uint16_t *A = P->a16 + slot * in2 * Kp, *B = P->b16 + slot * r2 * out16;
#ifdef TM_AMX
            if (R == 16) {
                lora_block_amx(P, A, B, x + row * in, in, y + row * out, out, xb);
                continue;
            }
#endif
            lora_block_bf16(P, A, B, x + row * in, in, y + row * out, out, (int)R, xb);
        }
#ifdef TM_AMX
        if (amx && xb) _tile_release();
#endif
        free(xb);
    }
    free(blk);
    return failed ? -1 : 0;
}
#endif  // AVX512-BF16

int tm_lora_bf16_available(void) {
#ifdef TM_LORA_BF16
    return 1;
#else
    return 0;
#endif
}

// rows [r0, r0 + m) of x [m, in] (row r0 first) and y [m, out]; returns 0, or -1 out of memory. One OpenMP region
// per call, over the rows of every adapter span (a region per adapter would pay a thread wake-up per adapter and
// projection).
int tm_lora_apply(const tm_lora *L, int which, const float *x, int64_t r0, int64_t m, int64_t in, float *y,
                  int64_t out) {
    if (!L || L->num_groups <= 0 || m <= 0) return 0;
    const tm_lora_proj *P = &L->proj[which];
    if (!P->a || !P->b || P->k <= 0) return 0;
    const int64_t K = P->k, G = L->num_groups;
    int64_t lo[G], off[G + 1];  // each span clipped to [r0, r0 + m); off: rows before span g
    off[0] = 0;
    for (int64_t g = 0; g < G; g++) {
        const int64_t a = L->starts[g] > r0 ? L->starts[g] : r0;
        const int64_t e = L->starts[g] + L->lens[g], b = e < r0 + m ? e : r0 + m;
        lo[g] = a;
        off[g + 1] = off[g] + (b > a ? b - a : 0);
    }
    const int64_t total = off[G];
    if (total == 0) return 0;
#ifdef TM_LORA_BF16
    if (P->a16 && P->b16 && P->nslices > 0 && P->cols && K % P->nslices == 0 && K <= 64 &&
        P->cols[P->nslices] == out) {
        int64_t rel[G], cnt[G];
        for (int64_t g = 0; g < G; g++) rel[g] = lo[g] - r0, cnt[g] = off[g + 1] - off[g];
        return lora_apply_bf16(L, P, x, in, y, out, rel, cnt, G, total);
    }
#endif
#pragma omp parallel for schedule(static) if (TM_TOP_LEVEL && total * K * (in + out) >= (1 << 17))
    for (int64_t j = 0; j < total; j++) {
        int64_t g = 0;
        while (off[g + 1] <= j) g++;
        const int64_t row = lo[g] + (j - off[g]) - r0;
        const float *A = P->a + L->slots[g] * in * K, *B = P->b + L->slots[g] * K * out;
        const float *xr = x + row * in;
#ifdef TM_AVX512
        if (K % 16 == 0 && K <= 64) {
            lora_row_avx512(xr, A, B, in, K, y + row * out, out, P->nslices, P->cols);
            continue;
        }
#endif
        float h[K];
        for (int64_t k = 0; k < K; k++) h[k] = 0.0f;
        for (int64_t i = 0; i < in; i++) {  // shrink: h = x[row] A
            const float xv = xr[i];
            const float *ar = A + i * K;
            for (int64_t k = 0; k < K; k++) h[k] += xv * ar[k];
        }
        float *yr = y + row * out;
        for (int64_t k = 0; k < K; k++) {  // expand: y[row] += h B
            const float hv = h[k];
            if (hv == 0.0f) continue;  // a zero-padded rank
            const float *br = B + k * out;
            for (int64_t o = 0; o < out; o++) yr[o] += hv * br[o];
        }
    }
    return 0;
}
