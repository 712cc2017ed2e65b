// Stage 2 of the sampler and the draw, fused per row for the CPU (tokenmill/sample/sampler.py's order and rules):
// temperature -> min_p -> top_k -> top_p -> inverse-CDF sampling with the row's uniform u. The PyTorch path
// (apply_sampling_filters, softmax, inverse_cdf in tokenmill/sample/logits_processors.py) is the reference: the same
// token for the same u up to float rounding at a boundary (a cumulative sum within ~1e-6 of u or top_p).
//
// Per row, over V logits: (1) max of x = l / T; (2) e = exp(x - max) into the row's scratch (e <= 1, the largest 1)
// with its sum; min_p drops e < min_p (probs < max_prob * min_p); (3) top_k and top_p find a threshold on e without a
// sort: a histogram of e's float bits (the top bits of a non-negative float order it like its value) over
// TM_SAMPLE_BINS bins, counts and mass per bin, scanned from the top to the bin where the k-th token / the top_p
// mass falls; only that bin's tokens are gathered and sorted. Ties at a threshold are kept (as the reference keeps
// every logit >= the k-th / the smallest kept one). (4) the draw: the first token, in vocabulary order, whose
// running kept mass exceeds u * the kept total (float sums of 64 tokens, double across them). Rows run under OpenMP; the scratch is the caller's.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "simd.h"

#define TM_SAMPLE_SHIFT 18                        // bins of the top 14 bits of e's float: 5 mantissa bits a bin
#define TM_SAMPLE_BINS ((0x3f800000u >> TM_SAMPLE_SHIFT) + 1)  // e <= 1.0f
#define CAND_FLOOR 0x1p-14f                   // thresholds look at e >= this first (the rest is a flat row's tail)

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static int cmp_desc(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

// The values of e[0..n) at or above lo and positive into c (room for n + 16), in order; returns how many. A full
// vector is stored at every step (register compress: memory-destination compress is slow on Zen 4).
static int64_t gather_at_least(const float *e, int64_t n, float lo, float *c) {
    int64_t m = 0, i = 0;
#ifdef __AVX512F__
    const __m512 lv = _mm512_set1_ps(lo), zero = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(e + i);
        const __mmask16 k = _mm512_cmp_ps_mask(v, lv, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
        _mm512_storeu_ps(c + m, _mm512_maskz_compress_ps(k, v));
        m += __builtin_popcount(k);
    }
#endif
    for (; i < n; i++)
        if (e[i] >= lo && e[i] > 0.0f) c[m++] = e[i];
    return m;
}

// The k-th largest (1-based, k <= m) of the m values c: histogram by bits, then the boundary bin sorted (into buf).
static float kth_largest(const float *c, int64_t m, int64_t k, int32_t *cnt, float *buf) {
    memset(cnt, 0, TM_SAMPLE_BINS * sizeof(int32_t));
    for (int64_t i = 0; i < m; i++) cnt[f2u(c[i]) >> TM_SAMPLE_SHIFT]++;
    int64_t above = 0;
    uint32_t b = TM_SAMPLE_BINS - 1;
    for (;; b--) {
        if (above + cnt[b] >= k || b == 0) break;
        above += cnt[b];
    }
    int64_t nb = 0;
    for (int64_t i = 0; i < m; i++)
        if ((f2u(c[i]) >> TM_SAMPLE_SHIFT) == b) buf[nb++] = c[i];
    qsort(buf, (size_t)nb, sizeof(float), cmp_desc);
    const int64_t j = k - above - 1;
    return buf[j < nb ? j : nb - 1];
}

// top_p over the m values c (those >= lo of the kept set, whose total mass is `kept`): the smallest kept value, token
// j in descending order kept iff the mass strictly ahead of it is below p * kept; or -1 when c's mass does not
// reach that (c was cut short of the kept set: the caller retries with all of it).
static float top_p_threshold(const float *c, int64_t m, double kept, float p, int32_t *cnt, double *mass,
                             float *buf) {
    memset(cnt, 0, TM_SAMPLE_BINS * sizeof(int32_t));
    memset(mass, 0, TM_SAMPLE_BINS * sizeof(double));
    for (int64_t i = 0; i < m; i++) {
        const uint32_t b = f2u(c[i]) >> TM_SAMPLE_SHIFT;
        cnt[b]++;
        mass[b] += c[i];
    }
    const double target = (double)p * kept;
    double ahead = 0.0;
    int64_t b = TM_SAMPLE_BINS - 1;
    for (; b >= 0; b--) {
        if (cnt[b] && ahead + mass[b] >= target) break;
        ahead += mass[b];
    }
    if (b < 0) return -1.0f;
    int64_t nb = 0;
    for (int64_t i = 0; i < m; i++)
        if ((int64_t)(f2u(c[i]) >> TM_SAMPLE_SHIFT) == b) buf[nb++] = c[i];
    qsort(buf, (size_t)nb, sizeof(float), cmp_desc);
    float thr = buf[0];
    for (int64_t j = 0; j < nb; j++) {
        if (ahead >= target) break;
        thr = buf[j];
        ahead += buf[j];
    }
    return thr;
}

// The kept mass (e >= lo; e is never negative) of each 64-token block of e into bs; returns their total (double).
static double kept_blocks(const float *e, int64_t V, float lo, float *bs) {
    double tot = 0.0;
    for (int64_t b = 0, s = 0; s < V; b++, s += 64) {
        const int64_t n = V - s < 64 ? V - s : 64;
        float acc = 0.0f;
        int64_t j = 0;
#ifdef __AVX512F__
        const __m512 lv = _mm512_set1_ps(lo);
        __m512 a = _mm512_setzero_ps();
        for (; j + 16 <= n; j += 16) {
            const __m512 v = _mm512_loadu_ps(e + s + j);
            a = _mm512_mask_add_ps(a, _mm512_cmp_ps_mask(v, lv, _CMP_GE_OQ), a, v);
        }
        acc = _mm512_reduce_add_ps(a);
#endif
        for (; j < n; j++)
            if (e[s + j] >= lo) acc += e[s + j];
        bs[b] = acc;
        tot += acc;
    }
    return tot;
}

// logits [B, V] (row stride ld), per row: temp (> 0; <= 0 skips the row: out = -1), min_p (0 = off), top_k (<= 0
// or >= V = off), top_p (>= 1 = off), u in [0, 1). work: [B, V] floats of scratch. out: [B] token ids.
// Returns 0, or -1 when a row's scratch could not be allocated.
int tm_sample_rows(const float *logits, int64_t B, int64_t V, int64_t ld, const float *temp, const float *min_p,
                   const int64_t *top_k, const float *top_p, const double *u, float *work, int64_t *out) {
    int err = 0;
#pragma omp parallel
    {
        int32_t *cnt = malloc(TM_SAMPLE_BINS * sizeof(int32_t));
        double *mass = malloc(TM_SAMPLE_BINS * sizeof(double));
        float *buf = malloc((size_t)V * sizeof(float));
        float *c = malloc((size_t)(V + 16) * sizeof(float));
        float *bs = malloc((size_t)((V + 63) / 64) * sizeof(float));
        const int ok = cnt && mass && buf && bs && c;
        if (!ok) {
#pragma omp atomic write
            err = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < B; r++) {
            out[r] = -1;
            if (!ok || !(temp[r] > 0.0f)) continue;
            const float *l = logits + r * ld;
            float *e = work + r * V;
            const float t = temp[r];
            float mx = -INFINITY;
            int64_t i = 0;
#ifdef __AVX512F__
            const __m512 tv = _mm512_set1_ps(t);
            __m512 mxv = _mm512_set1_ps(-INFINITY);
            for (; i + 16 <= V; i += 16) {
                const __m512 x = _mm512_div_ps(_mm512_loadu_ps(l + i), tv);
                _mm512_storeu_ps(e + i, x);
                mxv = _mm512_max_ps(x, mxv);  // a NaN x keeps mxv
            }
            mx = _mm512_reduce_max_ps(mxv);
#endif
            for (; i < V; i++) {
                const float x = l[i] / t;
                e[i] = x;
                if (x > mx) mx = x;
            }
            if (!(mx > -INFINITY) || mx == INFINITY) {  // all banned, or an infinite logit: the (first) max
                int64_t arg = 0;
                for (int64_t j = 0; j < V; j++)
                    if (e[j] == mx) { arg = j; break; }
                out[r] = arg;
                continue;
            }
            i = 0;
#ifdef __AVX512F__
            const __m512 mv = _mm512_set1_ps(mx);
            const __m512 zero = _mm512_setzero_ps(), floor = _mm512_set1_ps(-87.0f);
            for (; i + 16 <= V; i += 16) {
                // exp16 clamps at -87.3: below -87 (a banned -inf logit among them) e is 0, as the reference's
                // float32 softmax underflows; max(NaN, 0) is 0, so a NaN logit is never drawn (nor binned)
                const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(e + i), mv);
                const __m512 v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, floor, _CMP_LT_OQ), exp16(d), zero);
                _mm512_storeu_ps(e + i, _mm512_max_ps(v, zero));
            }
#endif
            for (; i < V; i++) {
                const float d = e[i] - mx;
                const float v = d < -87.0f ? 0.0f : expf(d);
                e[i] = v >= 0.0f ? v : 0.0f;
            }
            // min_p, then top_k, then top_p: a lower bound lo on e (everything below is dropped). The thresholds
            // look at the values above CAND_FLOOR first (few, unless the row is flat), all of them if those fall short.
            float lo = min_p[r] > 0.0f ? min_p[r] : 0.0f;
            const int64_t k = top_k[r];
            if (k > 0 && k < V) {
                const float fl = lo > CAND_FLOOR ? lo : CAND_FLOOR;
                int64_t m = gather_at_least(e, V, fl, c);
                if (m < k && fl > lo) m = gather_at_least(e, V, lo, c);
                if (m >= k) {  // else fewer than k tokens have mass: top_k keeps them all
                    const float kth = kth_largest(c, m, k, cnt, buf);
                    if (kth > lo) lo = kth;
                }
            }
            double kept = kept_blocks(e, V, lo, bs);
            if (top_p[r] < 1.0f) {
                const float fl = lo > CAND_FLOOR ? lo : CAND_FLOOR;
                float thr = top_p_threshold(c, gather_at_least(e, V, fl, c), kept, top_p[r], cnt, mass, buf);
                if (thr < 0.0f && fl > lo) thr = top_p_threshold(c, gather_at_least(e, V, lo, c), kept, top_p[r], cnt,
                                                                 mass, buf);
                if (thr > lo) {
                    lo = thr;
                    kept = kept_blocks(e, V, lo, bs);
                }
            }
            // the draw: first token (vocabulary order) whose running kept mass exceeds u * kept: the block first
            // (float sums of 64, double across), then token by token (double) from that block on
            const double target = u[r] * kept;
            double run = 0.0;
            int64_t b = 0;
            const int64_t nb = (V + 63) / 64;
            for (; b < nb - 1 && run + bs[b] <= target; b++) run += bs[b];
            int64_t tok = -1;
            for (int64_t j = b * 64; j < V; j++) {
                if (!(e[j] >= lo) || e[j] <= 0.0f) continue;
                run += e[j];
                if (run > target) { tok = j; break; }
            }
            int64_t last = V - 1;  // u * kept rounded up to the total: the last token with mass
            while (tok < 0 && last > 0 && !(e[last] >= lo && e[last] > 0.0f)) last--;
            out[r] = tok >= 0 ? tok : last;
        }
        free(cnt);
        free(mass);
        free(buf);
        free(bs);
        free(c);
    }
    return err;
}
