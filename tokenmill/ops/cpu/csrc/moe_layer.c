// One mixture-of-experts decoder layer (OLMoE / Mixtral / Qwen3-MoE shaped: attention with optional full-width or
// per-head q/k RMSNorm and clipping, a softmax top-k router, packed routed experts, no shared expert) in a single
// call, for CPU steps whose attention runs on the paged kernel (decodes, short chunks). float32 activations, a
// float32 or bfloat16 paged KV cache. The reference is the per-op path (model/decoder.py DecoderLayer,
// layers/attention.py SelfAttention, layers/moe.py MoEBlock), which tokenmill/ops/cpu/moe_layer.py falls back to
// and tests/ops/test_cpu_moe_layer.py compares against.
//
//   residual = h + residual (or h);  x = rmsnorm(residual) * ln1
//   q|k|v = x Wqkv^T (+ b);  q, k RMSNorm (full: over all heads' values; head: per head);  clip q, k, v
//   rotate q, k ("rotate half", cos/sin [T, D]);  store k, v at their slots;  a = paged attention(q)
//   residual = a Wo^T (+ b) + residual;  x = rmsnorm(residual) * ln2
//   logits = x Wr^T (float32 router);  p = softmax(logits);  the top k of p (renormalized if asked), counted
//   out = sum over the chosen experts of p_e * expert_e(x)   (moe.c's tm_moe_packed)
//
// At 16 decodes the per-op path spends ~60 PyTorch dispatches and Python a layer around these kernels.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "simd.h"

// A layer's fixed arguments (weights, shapes, switches), built once per layer in Python (moe_layer.py
// TmMoELayer: every field 8 bytes, in this order).
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, window;
    double eps, scale, clip;  // clip <= 0: none
    int64_t qk_norm;          // 0 none, 1 full (q over H*D, k over Hkv*D), 2 per head (over D)
    const float *ln1, *ln2, *q_norm, *k_norm;
    int64_t qt_qkv;
    const void *w_qkv;
    const float *b_qkv;
    int64_t qt_o;
    const void *w_o;
    const float *b_o;
    int64_t lin_direct_max_m, lin_amx_min_m;
    // router and experts
    const float *w_router;  // [E, hidden] float32
    int64_t num_experts, top_k, renormalize, inter;
    int64_t qt13, qt2;
    const uint8_t *w13, *w2;
    int64_t row_bytes_h, row_bytes_i;
    int64_t direct_max_m, i8_max_m, amx_i8_min_m, amx_min_m;
    int64_t *expert_counts;  // [E] int64, += tokens routed (NULL: not counted)
} tm_moe_layer_t;

// Floats of scratch tm_moe_layer needs for T tokens besides the experts' workspace: ids [T, top_k] (int64: 2 floats
// each), x [T, E], q|k|v [T, nqkv], att [T, H*D], logits / weights [T, num_experts + top_k].
int64_t tm_moe_layer_scratch_floats(int64_t T, int64_t hidden, int64_t nqkv, int64_t nq, int64_t num_experts,
                                    int64_t top_k) {
    return T * (hidden + nqkv + nq + num_experts + 3 * top_k) + 16;
}

static void store_kv_row(void *kv, int kv_dtype, int64_t row, const float *src, int64_t n) {
    if (kv_dtype == 0) {
        memcpy((float *)kv + row * n, src, (size_t)n * sizeof(float));
        return;
    }
    tm_store_bf16_row((uint16_t *)kv + row * n, src, n);  // round to nearest even, as torch's .to(torch.bfloat16)
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// The token's rows of q|k|v after the projection: q/k norms, clipping, rotary (in place; row of nqkv floats).
static void qkv_epilogue(const tm_moe_layer_t *L, float *row, const float *c, const float *s) {
    const int64_t H = L->heads, Hkv = L->kv_heads, D = L->head_dim, nq = H * D, nkv = Hkv * D;
    const float eps = (float)L->eps;
    if (L->qk_norm == 1) {  // full-width norms, then the clip (OLMoE)
        add_rmsnorm_f32(row, NULL, L->q_norm, 1, nq, eps, NULL, row);
        add_rmsnorm_f32(row + nq, NULL, L->k_norm, 1, nkv, eps, NULL, row + nq);
    }
    if (L->clip > 0) {
        const float lim = (float)L->clip;
        for (int64_t i = 0; i < nq + 2 * nkv; i++) row[i] = row[i] < -lim ? -lim : (row[i] > lim ? lim : row[i]);
    }
    if (L->qk_norm == 2) {  // per-head norms after the clip (Qwen3), as SelfAttention.forward orders them
        add_rmsnorm_f32(row, NULL, L->q_norm, H, D, eps, NULL, row);
        add_rmsnorm_f32(row + nq, NULL, L->k_norm, Hkv, D, eps, NULL, row + nq);
    }
    tm_rope_heads(row, H + Hkv, D, c, s);  // q's heads, then k's (contiguous in the row)
}

// logits [T, E] -> the top k of softmax(logits) per token into ids / w (renormalized if asked); ties keep the
// lower expert id.
static void route(const tm_moe_layer_t *L, float *logits, int64_t T, int64_t *ids, float *w) {
    const int64_t E = L->num_experts, K = L->top_k;
    for (int64_t t = 0; t < T; t++) {
        float *p = logits + t * E;
        float mx = p[0], sum = 0.0f;
        for (int64_t e = 1; e < E; e++) mx = p[e] > mx ? p[e] : mx;
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < E; e++) p[e] *= inv;
        float chosen = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                if (p[e] < 0.0f) continue;  // taken (marked below)
                if (best < 0 || p[e] > p[best]) best = e;
            }
            ids[t * K + k] = best;
            w[t * K + k] = p[best];
            chosen += p[best];
            p[best] = -1.0f;
        }
        if (L->renormalize)
            for (int64_t k = 0; k < K; k++) w[t * K + k] /= chosen;
    }
}

// h [T, hidden] (the layer's input), residual [T, hidden] (has_residual 0: none yet; written as the per-op path
// leaves it), cos / sin [T, D]; kv [2, nb, bs, Hkv, D]; slots [T], block tables / seq_lens / query start locations
// as attention.c's tm_paged_attention takes them; scratch (tm_moe_layer_scratch_floats), ws / ws_floats the
// experts' workspace (moe.c); out [T, hidden]. Returns 0, -1 out of memory, -2 an expert / block id out of range,
// -3 KV dtype, -4 shapes, -6 a slot outside the cache, -7 a linear rejected its arguments.
int tm_moe_layer(const tm_moe_layer_t *L, const float *h, float *residual, int has_residual, int64_t T,
                 const float *cos, const float *sin, void *kv, int kv_dtype, int64_t nb, int bs, const int64_t *slots,
                 const int32_t *tables, int64_t bt_stride, int64_t bt_cols, const int32_t *seq_lens,
                 const int32_t *qsl, int num_reqs, float *scratch, float *ws, int64_t ws_floats, float *out) {
    if (T <= 0) return 0;
    const int64_t E = L->hidden, H = L->heads, Hkv = L->kv_heads, D = L->head_dim;
    if (H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || D % 2 || E <= 0 || L->num_experts <= 0 || L->top_k <= 0
        || L->top_k > L->num_experts || (L->qk_norm != 0 && (!L->q_norm || !L->k_norm)))
        return -4;
    if (kv_dtype != 0 && kv_dtype != 1) return -3;
    const int64_t nq = H * D, nkv = Hkv * D, nqkv = nq + 2 * nkv, NE = L->num_experts, K = L->top_k;
    const int64_t cache_rows = nb * bs;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] >= cache_rows) return -6;
    int64_t *ids = (int64_t *)scratch;  // first: 8-byte aligned where scratch is
    float *x = scratch + 2 * T * K, *qkv = x + T * E, *att = qkv + T * nqkv, *logits = att + T * nq;
    float *w = logits + T * NE;
    const float eps = (float)L->eps;
    // attention block
    add_rmsnorm_f32(h, has_residual ? residual : NULL, L->ln1, T, E, eps, residual, x);
    if (qlinear_any((int)L->qt_qkv, x, T, E, L->w_qkv, nqkv, L->b_qkv, qkv, L->lin_direct_max_m, L->lin_amx_min_m))
        return -7;
#pragma omp parallel for schedule(static) if (T >= 4)
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * nqkv;
        qkv_epilogue(L, row, cos + t * D, sin + t * D);
        if (slots[t] >= 0) {  // < 0: padding
            store_kv_row(kv, kv_dtype, slots[t], row + nq, nkv);
            store_kv_row(kv, kv_dtype, cache_rows + slots[t], row + nq + nkv, nkv);
        }
    }
    int rc = tm_paged_attention(qkv, nqkv, D, kv, kv_dtype, nb, bs, (int)Hkv, (int)D, tables, bt_stride, bt_cols,
                                seq_lens, qsl, num_reqs, (int)H, (float)L->scale, (int)L->window, att);
    if (rc) return rc;
    float *o = qkv;  // q|k|v is dead after the attention
    if (qlinear_any((int)L->qt_o, att, T, nq, L->w_o, E, L->b_o, o, L->lin_direct_max_m, L->lin_amx_min_m))
        return -7;
    add_rmsnorm_f32(o, residual, L->ln2, T, E, eps, residual, x);
    // router: logits [T, NE] in float32, then softmax top-k
#pragma omp parallel for schedule(static) if (T * NE * E >= (1 << 18))
    for (int64_t i = 0; i < T * NE; i++) logits[i] = dot_f32(x + (i / NE) * E, L->w_router + (i % NE) * E, E);
    route(L, logits, T, ids, w);
    if (L->expert_counts)
        for (int64_t i = 0; i < T * K; i++) L->expert_counts[ids[i]]++;
    rc = tm_moe_packed((int)L->qt13, (int)L->qt2, x, T, E, L->inter, NE, K, ids, w, L->w13, L->row_bytes_h, L->w2,
                       L->row_bytes_i, L->direct_max_m, L->i8_max_m, L->amx_i8_min_m, L->amx_min_m, ws, ws_floats,
                       out);
    return rc;
}
