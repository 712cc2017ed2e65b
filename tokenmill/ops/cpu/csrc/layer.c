// One Llama-family decoder layer in a single call, for small CPU batches (decode steps): packed GGUF
// weights (any type of quant.h; a linear of type TM_QPARTS is row groups of several types, kernels.h), float32
// activations, a float32, bfloat16 or int8 paged KV cache (int8: kv_quant.py's layout, its scales in kv_scale).
//
//   residual = h + residual (or h);  x = rmsnorm(residual) * ln1
//   q|k|v = x Wqkv^T (+ b);  rotate q, k ("rotate half" layout, cos/sin [T, D]);  store k, v at their slots
//   a = paged attention(q) over each request's cache;  o = a Wo^T (+ b)
//   residual = o + residual;  x = rmsnorm(residual) * ln2
//   g|u = x Wgu^T (+ b);  out = (silu(g) * u) Wdown^T (+ b)
//
// With `lora` (NULL: none), each projection's batched LoRA term is added after it (lora.c).
// The same kernels the per-op path calls (qlinear.c, attention.c, rmsnorm.c, linked into this library; see
// kernels.h), chained in C: at batch 1 the per-op path spends most of a step in ~45 PyTorch dispatches and Python
// per layer. The reference is that per-op path (tokenmill/model/llama.py), which the tests compare against.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "simd.h"

#define POST_BLOCK 512  // rows per block of the post-attention half (the AMX path's pass size)

// act[t, i] = silu(g) * u for gu rows [g (I) | u (I)] (simd.h's tm_silu_mul_row), threads for long steps.
static void silu_mul_rows(const float *gu, int64_t T, int64_t I, float *act) {
#pragma omp parallel for schedule(static) if (T * I >= (1 << 16))
    for (int64_t t = 0; t < T; t++) tm_silu_mul_row(gu + t * 2 * I, gu + t * 2 * I + I, act + t * I, I);
}

// One row of n floats (a token's K or V head) as int8 with its scale, as kv_quant.quantize_int8 does it: scale =
// max(absmax, 1e-12) / 127, q = round-half-even(x / scale) in [-127, 127]. A true division (not x * (1 / scale), which
// -ffast-math's reciprocal math would allow): the cache bytes equal the PyTorch write's.
__attribute__((optimize("no-reciprocal-math"))) static void store_i8_row(int8_t *dst, float *scale, const float *x,
                                                                         int64_t n) {
    float amax = 0.f;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float s = fmaxf(amax, 1e-12f) / 127.f;
    for (int64_t i = 0; i < n; i++) {
        const float r = rintf(x[i] / s);
        dst[i] = (int8_t)(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
    }
    *scale = s;
}

// x [T, rows of width D] rotated in place; heads per token nh, token stride st (floats).
static void rope_inplace(float *x, int64_t T, int64_t st, int nh, int D, const float *cos, const float *sin) {
#pragma omp parallel for schedule(static) if (T * nh * D >= (1 << 15))
    for (int64_t t = 0; t < T; t++) tm_rope_heads(x + t * st, nh, D, cos + t * D, sin + t * D);
}

// The layer in two halves around the attention, for steps whose attention runs elsewhere (long prefill chunks
// in bf16: the AMX prefill kernel or SDPA): tm_llama_layer_pre = residual add, RMSNorm, q|k|v projection, rotary,
// K/V written at their slots, leaving q|k|v [T, nqkv] in qkv_out; tm_llama_layer_post = o projection of att
// [T, H*D], residual add, RMSNorm, MLP into out, in blocks of POST_BLOCK rows, the intermediates in `work` (min(T, POST_BLOCK) * (2E + 3I)
// floats; NULL: allocated here). Long steps pass a buffer kept across layers and steps: a fresh one of over
// 32 MiB is mmapped by malloc and page-faulted in on every call, which cost 40% of a 2048-token step.
// tm_llama_layer chains them with the paged attention kernel in between.
// kv_dtype: attention.c's codes 0 float32, 1 bfloat16, 3 int8 (with kv_scale [2, nb, bs, Hkv]; NULL otherwise).
// Returns 0, or (attention.c's codes) -1 out of memory, -3 KV dtype, -4 shapes; -6 a slot outside the cache, -7 a
// linear rejected its arguments (K not a multiple of the block, unknown type).
int tm_llama_layer_pre(const float *h, float *residual, int has_residual, int64_t T, int64_t E,
                       const float *ln1, float eps, int qt_qkv, const uint8_t *w_qkv, const float *b_qkv,
                       int H, int Hkv, int D, const float *cos, const float *sin,
                       void *kv, int kv_dtype, float *kv_scale, int64_t nb, int bs, const int64_t *slots,
                       int64_t direct_max_m, int64_t amx_min_m, const tm_lora *lora, float *qkv) {
    if (T <= 0) return 0;
    if (H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || D % 2 || E <= 0) return -4;
    if ((kv_dtype != 0 && kv_dtype != 1 && kv_dtype != 3) || (kv_dtype == 3) != (kv_scale != NULL)) return -3;
    const int64_t nq = (int64_t)H * D, nkv = (int64_t)Hkv * D, nqkv = nq + 2 * nkv;
    float *x = (float *)malloc((size_t)(T * E) * sizeof(float));
    if (!x) return -1;
    int rc = 0;
    add_rmsnorm_f32(h, has_residual ? residual : NULL, ln1, T, E, eps, residual, x);
    if (qlinear_any(qt_qkv, x, T, E, w_qkv, nqkv, b_qkv, qkv, direct_max_m, amx_min_m) != 0) { rc = -7; goto done; }
    if (tm_lora_apply(lora, 0, x, 0, T, E, qkv, nqkv) != 0) { rc = -1; goto done; }
    rope_inplace(qkv, T, nqkv, H, D, cos, sin);
    rope_inplace(qkv + nq, T, nqkv, Hkv, D, cos, sin);
    const int64_t cache_rows = nb * bs;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] >= cache_rows) { rc = -6; goto done; }
#pragma omp parallel for schedule(static) if (T >= 256)
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slots[t];
        if (s < 0) continue;  // padding
        const float *k = qkv + t * nqkv + nq, *v = k + nkv;
        if (kv_dtype == 0) {
            float *kc = (float *)kv;
            memcpy(kc + s * nkv, k, nkv * sizeof(float));
            memcpy(kc + (cache_rows + s) * nkv, v, nkv * sizeof(float));
        } else if (kv_dtype == 3) {  // int8: each head's row with its scale
            int8_t *kc = (int8_t *)kv;
            for (int j = 0; j < Hkv; j++) {
                store_i8_row(kc + s * nkv + j * D, kv_scale + s * Hkv + j, k + j * D, D);
                store_i8_row(kc + (cache_rows + s) * nkv + j * D, kv_scale + (cache_rows + s) * Hkv + j, v + j * D, D);
            }
        } else {  // bfloat16 cache: round to nearest even (what torch's .to(torch.bfloat16) does)
            uint16_t *kc = (uint16_t *)kv;
            tm_store_bf16_row(kc + s * nkv, k, nkv);
            tm_store_bf16_row(kc + (cache_rows + s) * nkv, v, nkv);
        }
    }
done:
    free(x);
    return rc;
}

int tm_llama_layer_post(const float *att, float *residual, int64_t T, int64_t E, const float *ln2, float eps,
                        int qt_o, const uint8_t *w_o, const float *b_o, int qt_gu, const uint8_t *w_gu,
                        const float *b_gu, int qt_dn, const uint8_t *w_dn, const float *b_dn, int64_t nq, int64_t I,
                        int64_t direct_max_m, int64_t amx_min_m, const tm_lora *lora, float *work, float *out) {
    if (T <= 0) return 0;
    if (E <= 0 || I <= 0 || nq <= 0) return -4;
    const int64_t tb = T < POST_BLOCK ? T : POST_BLOCK;
    float *buf = work ? work : (float *)malloc((size_t)(tb * (E + E + 3 * I)) * sizeof(float));
    if (!buf) return -1;
    float *o = buf, *x = o + tb * E, *gu = x + tb * E, *act = gu + tb * 2 * I;
    int rc = 0;
    // row blocks: the workspace is 12 MiB at 512 rows for SmolLM2 whatever the step's length (47 MiB at 2048
    // tokens otherwise); the AMX linears re-dequantize their weights per 512 rows anyway, so blocks cost no more
    for (int64_t t0 = 0; t0 < T && rc == 0; t0 += tb) {
        const int64_t m = T - t0 < tb ? T - t0 : tb;
        float *res = residual + t0 * E, *y = out + t0 * E;
        if (qlinear_any(qt_o, att + t0 * nq, m, nq, w_o, E, b_o, o, direct_max_m, amx_min_m) != 0) { rc = -7; break; }
        if (tm_lora_apply(lora, 1, att + t0 * nq, t0, m, nq, o, E) != 0) { rc = -1; break; }
        add_rmsnorm_f32(o, res, ln2, m, E, eps, res, x);
        // many rows on the AMX tiles without LoRA: silu(g) * u straight from the accumulators (g|u never stored)
        const int glu = lora ? 0 : tm_qlinear_glu(qt_gu, x, m, E, w_gu, I, b_gu, act, amx_min_m);
        if (glu < 0) { rc = -1; break; }
        if (!glu) {
            if (qlinear_any(qt_gu, x, m, E, w_gu, 2 * I, b_gu, gu, direct_max_m, amx_min_m) != 0) { rc = -7; break; }
            if (tm_lora_apply(lora, 2, x, t0, m, E, gu, 2 * I) != 0) { rc = -1; break; }
            silu_mul_rows(gu, m, I, act);
        }
        if (qlinear_any(qt_dn, act, m, I, w_dn, E, b_dn, y, direct_max_m, amx_min_m) != 0) { rc = -7; break; }
        if (tm_lora_apply(lora, 3, act, t0, m, I, y, E) != 0) rc = -1;
    }
    if (!work) free(buf);
    return rc;
}

// The whole layer (see the top of the file). Returns as the halves, and -2 block id out of range, -3 KV dtype
// from the attention.
int tm_llama_layer(const float *h, float *residual, int has_residual, int64_t T, int64_t E,
                   const float *ln1, const float *ln2, float eps,
                   int qt_qkv, const uint8_t *w_qkv, const float *b_qkv,
                   int qt_o, const uint8_t *w_o, const float *b_o,
                   int qt_gu, const uint8_t *w_gu, const float *b_gu,
                   int qt_dn, const uint8_t *w_dn, const float *b_dn,
                   int H, int Hkv, int D, int64_t I,
                   const float *cos, const float *sin,
                   void *kv, int kv_dtype, float *kv_scale, int64_t nb, int bs, const int64_t *slots,
                   const int32_t *tables, int64_t bt_stride, int64_t bt_cols,
                   const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                   float scale, int window, int64_t direct_max_m, int64_t amx_min_m, const tm_lora *lora,
                   float *out) {
    if (T <= 0) return 0;
    if (H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || D % 2 || E <= 0 || I <= 0) return -4;
    const int64_t nq = (int64_t)H * D, nkv = (int64_t)Hkv * D, nqkv = nq + 2 * nkv;
    float *buf = (float *)malloc((size_t)(T * (nqkv + nq)) * sizeof(float));
    if (!buf) return -1;
    float *qkv = buf, *att = qkv + T * nqkv;
    int rc = tm_llama_layer_pre(h, residual, has_residual, T, E, ln1, eps, qt_qkv, w_qkv, b_qkv, H, Hkv, D, cos, sin,
                                kv, kv_dtype, kv_scale, nb, bs, slots, direct_max_m, amx_min_m, lora, qkv);
    if (rc == 0)
        rc = tm_paged_attention_kv(qkv, nqkv, D, kv, kv_dtype, kv_scale, nb, bs, Hkv, D, tables, bt_stride, bt_cols,
                                   seq_lens, qsl, num_reqs, H, scale, window, att);
    if (rc == 0)
        rc = tm_llama_layer_post(att, residual, T, E, ln2, eps, qt_o, w_o, b_o, qt_gu, w_gu, b_gu, qt_dn, w_dn, b_dn,
                                 nq, I, direct_max_m, amx_min_m, lora, NULL, out);
    free(buf);
    return rc;
}
