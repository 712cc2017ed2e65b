// Batched LoRA inside the fused decoder layer (layer.c): after a packed projection y = x W^T, each adapter's
// rows get y += (x A) B, A = a[slot] [in, K], B = b[slot] [K, out] (tokenmill/lora/runtime.py's stacked slot
// buffers: rank padded with zeros, B block-diagonal over the packed slices, scaling folded in). The step's rows
// come ordered by adapter, so each adapter is one contiguous row span (start, len, slot); rows outside every
// span are the base model's. The reference is tokenmill/ops/lora/reference.py (the per-op path's op).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

// rows [r0, r0 + m) of x [m, in] (row r0 first) and y [m, out]; returns 0 or -1 (out of memory).
int tm_lora_apply(const tm_lora *L, int which, const float *x, int64_t r0, int64_t m, int64_t in, float *y,
                  int64_t out) {
    if (!L || L->num_groups <= 0 || m <= 0) return 0;
    const tm_lora_proj *P = &L->proj[which];
    if (!P->a || !P->b || P->k <= 0) return 0;
    const int64_t K = P->k;
    for (int g = 0; g < L->num_groups; g++) {
        const int64_t lo0 = L->starts[g], hi0 = lo0 + L->lens[g];
        const int64_t lo = lo0 > r0 ? lo0 : r0, hi = hi0 < r0 + m ? hi0 : r0 + m;
        if (hi <= lo) continue;
        const int64_t n = hi - lo;
        const float *A = P->a + L->slots[g] * in * K, *B = P->b + L->slots[g] * K * out;
        float *h = (float *)calloc((size_t)(n * K), sizeof(float));
        if (!h) return -1;
#pragma omp parallel for schedule(static) if (n * in * K >= (1 << 16))
        for (int64_t t = 0; t < n; t++) {  // shrink: h[t] = x[row] A
            const float *xr = x + (lo - r0 + t) * in;
            float *hr = h + t * K;
            for (int64_t i = 0; i < in; i++) {
                const float xv = xr[i];
                const float *ar = A + i * K;
                for (int64_t k = 0; k < K; k++) hr[k] += xv * ar[k];
            }
        }
#pragma omp parallel for schedule(static) if (n * K * out >= (1 << 16))
        for (int64_t t = 0; t < n; t++) {  // expand: y[row] += h[t] B
            float *yr = y + (lo - r0 + t) * out;
            const float *hr = h + t * K;
            for (int64_t k = 0; k < K; k++) {
                const float hv = hr[k];
                if (hv == 0.0f) continue;  // a zero-padded rank
                const float *br = B + k * out;
                for (int64_t o = 0; o < out; o++) yr[o] += hv * br[o];
            }
        }
        free(h);
    }
    return 0;
}
