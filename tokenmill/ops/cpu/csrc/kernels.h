// The functions the kernel translation units export to each other (layer.c chains rmsnorm.c, qlinear.c and
// attention.c) and to Python (ctypes, tokenmill/ops/cpu/*.py; layer.c's entry points are called from Python only).
// Each library tokenmill/ops/cpu/build.py builds links the units it needs; every unit includes this header, so a
// definition that drifts from its declaration fails to compile.
#ifndef TM_KERNELS_H
#define TM_KERNELS_H

#include <omp.h>
#include <stdint.h>

// The condition of the OpenMP regions in kernels that other kernels call from inside their own parallel region
// (moe.c's tasks call qlinear): there they run on the calling thread. libgomp's default max-active-levels is
// unlimited, so a nested region would start a new team per outer thread and oversubscribe the cores.
#define TM_TOP_LEVEL (!omp_in_parallel())

// rmsnorm.c: s = x (+ r); out = w * s / sqrt(mean(s^2) + eps), rows of D.
void add_rmsnorm_f32(const float *x, const float *r, const float *w, int64_t M, int64_t D, float eps,
                     float *sum_out, float *out);

// qlinear.c (+ qlinear_amx.c): y[M,N] = x[M,K] @ W[N,K]^T (+ bias), W packed GGUF blocks.
int qlinear_f32(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                float *y, int64_t direct_max_m, int64_t amx_min_m);
// A packed weight of up to 4 row groups of different block types, their outputs back to back (a merged q|k|v whose
// shards differ): the weight pointer of qlinear_any's type TM_QPARTS. 8-byte fields (ctypes: layer.py).
#define TM_QPARTS (-1)
#define TM_QPARTS_MAX 4
typedef struct {
    int64_t n;                        // row groups
    int64_t qtype[TM_QPARTS_MAX];     // their block types
    int64_t rows[TM_QPARTS_MAX];      // their output rows (summing to N)
    const uint8_t *w[TM_QPARTS_MAX];  // their packed rows
} tm_qparts;
// A packed weight with its AMX panels (tm_qlinear_amx_pack, NULL: none): the weight pointer of qlinear_any's type
// TM_QPANELS. Calls the AMX path would take read the panels instead of dequantizing W; the others read W.
#define TM_QPANELS (-2)
typedef struct {
    int64_t qtype;           // W's block type
    const uint8_t *w;        // W's packed rows
    const uint32_t *panels;  // W in the AMX tiles' bf16 pair layout, or NULL
    int64_t glu;             // 0, or I: W is gate|up [2I, K] and the panels are tm_qlinear_amx_pack_glu's
    int64_t i8;              // 1: `panels` is tm_qlinear_i8g_pack's int8 buffer (no AMX: VNNI), not bf16 panels
} tm_qpanels;
int tm_qlinear_amx_pack(int qtype, const uint8_t *w, int64_t K, int64_t N, uint32_t *out);
// The panels of a gate|up W [2I, K] (I % 16 == 0) ordered so that each pair of panels holds 16 gates and their 16
// ups: the AMX path can then write silu(gate) * up straight from its accumulators (tm_qlinear_glu).
int tm_qlinear_amx_pack_glu(int qtype, const uint8_t *w, int64_t K, int64_t I, uint32_t *out);
int64_t tm_qlinear_amx_panel_words(int64_t K, int64_t N);
// qlinear_bf16.c: the same panels for a 16-bit float weight (BF16 / F16) run with AVX512-BF16's vdpbf16ps where
// there is no tile unit (Zen 4): x rounded to bf16, float32 sums, the AMX path's numerics. _available: 1 where
// built (AVX512-BF16). _pack / _pack_glu: tm_qlinear_amx_pack's layouts (-1 bad arguments or not a 16-bit type,
// -2 not built). _panels: y[M, N] (row stride ldy) = x W^T (+ bias), or with glu = I (the _pack_glu panels,
// N = 2I) act[M, I] = silu(gate) * up; 0, -1 bad arguments or out of memory, -2 not built.
int tm_qlinear_bf16_available(void);
int tm_qlinear_bf16_pack(int qtype, const uint8_t *w, int64_t K, int64_t N, uint32_t *out);
int tm_qlinear_bf16_pack_glu(int qtype, const uint8_t *w, int64_t K, int64_t I, uint32_t *out);
int tm_qlinear_bf16_panels(const uint32_t *panels, const float *x, int64_t M, int64_t K, int64_t N,
                           const float *bias, float *y, int64_t ldy, int64_t glu, float *act);
// qlinear_f32, or for qtype TM_QPARTS each group of the tm_qparts at w into its columns of y, for TM_QPANELS the
// tm_qpanels at w.
int qlinear_any(int qtype, const float *x, int64_t M, int64_t K, const void *w, int64_t N, const float *bias,
                float *y, int64_t direct_max_m, int64_t amx_min_m);
// act[M, I] = silu(g) * u for [g | u] = x W^T (+ bias) in one pass, where the AMX path takes it: qtype TM_QPANELS
// with glu == I and M >= amx_min_m on a granted tile unit. 1: done; 0: not taken (the caller runs qlinear_any and
// its own silu, same values); -1: the kernel failed.
int tm_qlinear_glu(int qtype, const float *x, int64_t M, int64_t K, const void *w, int64_t I, const float *bias,
                   float *act, int64_t amx_min_m);
// 1 where gemm auto's k-quant direct path takes int8 activations (compiled for AVX512-VNNI), else 0.
int tm_qlinear_i8_direct(void);
int qdequant_rows(int qtype, const uint8_t *w, int64_t N, int64_t K, const int64_t *rows, int64_t R, float *out);
int tm_amx_init(void);

// attention.c: paged attention over a block pool; bf16 gather of one request's K/V (the `attention` library
// links attention.c, attention_prefill.c and attention_prefill_bf16.c; tm_attention_abi_version 2: with
// tm_prefill_attention).
int tm_attention_abi_version(void);
int tm_kv_dtype_supported(int kv_dtype);
int tm_kv_read_in_place(int kv_dtype, int d);
int tm_paged_attention(const float *q, int64_t q_st, int64_t q_sh,
                       const void *kv, int kv_dtype, int64_t num_blocks, int block_size, int hkv, int d,
                       const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                       const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                       int h, float scale, int window, float *out);
// tm_paged_attention over any pool tm_kv_dtype_supported takes, quantized ones (3 int8, 4 fp8 e4m3) with their
// float32 scales (kv_quant.py's layout: int8 [2, num_blocks, block_size, hkv], fp8 [2, hkv]; NULL for plain pools).
int tm_paged_attention_kv(const float *q, int64_t q_st, int64_t q_sh,
                          const void *kv, int kv_dtype, const float *kv_scale, int64_t num_blocks, int block_size,
                          int hkv, int d, const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                          const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                          int h, float scale, int window, float *out);
int tm_gather_kv_bf16(const float *kv, int64_t nb, int bs, int64_t row, const int32_t *block_ids, int64_t seq_len,
                      uint16_t *out);

// attention_prefill.c: tm_paged_attention's arguments and results (up to bf16 rounding) with bf16 products, for
// prefill chunks: on the AMX tile unit, or with AVX512-BF16's vdpbf16ps (attention_prefill_bf16.c). _init picks the
// kernel (AMX where Linux grants the tile state, else AVX512-BF16) and returns _path's code (0 none, 1 AMX,
// 2 AVX512-BF16); _supported: whether a pool of this dtype and head dim can be read (0 before _init, or with no
// kernel built). Returns tm_paged_attention's codes, -5 unsupported.
int tm_prefill_attention_init(void);
int tm_prefill_attention_path(void);
int tm_prefill_attention_supported(int kv_dtype, int d);
int tm_prefill_attention(const float *q, int64_t q_st, int64_t q_sh,
                         const void *kv, int kv_dtype, int64_t num_blocks, int block_size, int hkv, int d,
                         const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                         const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                         int h, float scale, int window, float *out);

// moe.c: a MoE layer's experts (packed gate|up and down, each its own block type) over routed tokens, one call
// per layer.
int tm_moe_packed(int qtype13, int qtype2, const float *x, int64_t T, int64_t H, int64_t I, int64_t E, int64_t K,
                  const int64_t *topk_ids, const float *topk_w, const uint8_t *w13, int64_t row_bytes_h,
                  const uint8_t *w2, int64_t row_bytes_i, int64_t direct_max_m, int64_t i8_max_m, int64_t amx_i8_min_m,
                  int64_t amx_min_m, float *ws, int64_t ws_floats, float *out);
// Floats of scratch tm_moe_packed uses for P token-expert pairs (hidden H, expert intermediate I).
int64_t tm_moe_ws_floats(int64_t P, int64_t H, int64_t I);

// Batched LoRA in the fused layer (lora.c). proj: 0 qkv, 1 o, 2 gate_up, 3 down; a [S, in, k], b [S, k, out]
// (NULL: no LoRA on that projection); num_groups contiguous row spans (starts, lens) of adapter slots (slots).
// Field order and 8-byte sizes are mirrored by ctypes in tokenmill/ops/cpu/layer.py (TmLoRA).
// b is block-diagonal over nslices packed slices (rank k / nslices each, columns cols[s]..cols[s+1]); nslices 0:
// treat b as dense. a16 / b16 (NULL: none): the same A and B in bfloat16, packed for vdpbf16ps (lora.c's layouts);
// given, the bfloat16 kernel runs (when built with AVX512-BF16), else the float32 one.
typedef struct {
    const float *a; const float *b; int64_t k; int64_t nslices; const int64_t *cols;
    const uint16_t *a16; const uint16_t *b16;
} tm_lora_proj;
typedef struct {
    tm_lora_proj proj[4];
    int64_t num_groups;
    const int64_t *starts, *lens, *slots;
} tm_lora;
int tm_lora_apply(const tm_lora *L, int which, const float *x, int64_t r0, int64_t m, int64_t in, float *y,
                  int64_t out);
int tm_lora_bf16_available(void);

#endif  // TM_KERNELS_H
