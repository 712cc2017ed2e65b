// Batched LoRA inside the fused decoder layer (layer.c): after a packed projection y = x W^T, each adapter's
// rows get y += (x A) B, A = a[slot] [in, K], B = b[slot] [K, out] (tokenmill/lora/runtime.py's stacked slot
// buffers: rank padded with zeros, B block-diagonal over the packed slices, scaling folded in). The step's rows
// come ordered by adapter, so each adapter is one contiguous row span (start, len, slot); rows outside every
// span are the base model's. The reference is tokenmill/ops/lora/reference.py (the per-op path's op).
#include <stdint.h>
#include "kernels.h"
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

// rows [r0, r0 + m) of x [m, in] (row r0 first) and y [m, out]; returns 0. One OpenMP region per call, over
// the rows of every adapter span (a region per adapter would pay a thread wake-up per adapter and projection).
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
