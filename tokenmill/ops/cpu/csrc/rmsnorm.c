// Fused residual add + RMSNorm over rows of float32: s = x (+ r); out = w * s / sqrt(mean(s^2) + eps).
// One call replaces ~7 tiny PyTorch ops per norm at batch 1 (each costs several microseconds of dispatch).
#include <math.h>
#include <stdint.h>
#include "kernels.h"
#include "simd.h"

// x, r (may be NULL), sum_out (may be NULL: then s is not stored), out: [M, D]; w: [D]. The sum of squares is
// kept in double (8-lane vectors on AVX-512, four independent accumulators: a serial double sum was the whole
// cost of the norm, ~4% of a prefill step).
void add_rmsnorm_f32(const float *x, const float *r, const float *w, int64_t M, int64_t D, float eps,
                     float *sum_out, float *out) {
#pragma omp parallel for schedule(static) if (M * D >= (1 << 16))
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * D;
        const float *ri = r ? r + i * D : 0;
        float *si = sum_out ? sum_out + i * D : out + i * D;
        double ss = 0.0;
        int64_t j = 0;
#ifdef __AVX512F__
        __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
        for (; j + 32 <= D; j += 32)
            for (int u = 0; u < 2; u++) {
                __m512 v = _mm512_loadu_ps(xi + j + 16 * u);
                if (ri) v = _mm512_add_ps(v, _mm512_loadu_ps(ri + j + 16 * u));
                _mm512_storeu_ps(si + j + 16 * u, v);
                const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
                acc[2 * u] = _mm512_fmadd_pd(lo, lo, acc[2 * u]);
                acc[2 * u + 1] = _mm512_fmadd_pd(hi, hi, acc[2 * u + 1]);
            }
        ss = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
#endif
        for (; j < D; j++) {
            const float v = ri ? xi[j] + ri[j] : xi[j];
            si[j] = v;
            ss += (double)v * v;
        }
        const float scale = 1.0f / sqrtf((float)(ss / (double)D) + eps);
        float *oi = out + i * D;
        for (j = 0; j < D; j++) oi[j] = w[j] * (si[j] * scale);
    }
}
