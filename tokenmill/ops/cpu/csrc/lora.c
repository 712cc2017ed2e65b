// Batched LoRA inside the fused decoder layer (layer.c): after a packed projection y = x W^T, each adapter's
// rows get y += (x A) B, A = a[slot] [in, K], B = b[slot] [K, out] (tokenmill/lora/runtime.py's stacked slot
// buffers: rank padded with zeros, B block-diagonal over the packed slices, scaling folded in). The step's rows
// come ordered by adapter, so each adapter is one contiguous row span (start, len, slot); rows outside every
// span are the base model's. The reference is tokenmill/ops/lora/reference.py (the per-op path's op).
#include <stdint.h>
#include "kernels.h"

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
#pragma omp parallel for schedule(static) if (total * K * (in + out) >= (1 << 17))
    for (int64_t j = 0; j < total; j++) {
        int64_t g = 0;
        while (off[g + 1] <= j) g++;
        const int64_t row = lo[g] + (j - off[g]) - r0;
        const float *A = P->a + L->slots[g] * in * K, *B = P->b + L->slots[g] * K * out;
        const float *xr = x + row * in;
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
