/* Paged attention on CPU: reads K/V straight from the block pool, one pass with online softmax.
 *
 * Pool of one layer: [2, num_blocks, block_size, Hkv, D] (0 = keys, 1 = values), float32, bfloat16, float16,
 * or quantized (tokenmill/ops/attention/kv_quant.py): int8 with float32 scales [2, num_blocks, block_size, Hkv]
 * (one per token and KV head: x = q * scale), fp8 e4m3 with float32 scales [2, Hkv] (one per KV head). Quantized
 * K/V are dequantized in registers: the K scales multiply each key's score column, the V scales each key's
 * probability before P V (same sums, a multiply per key instead of per element).
 * Queries q [T, H, D] float32 (any token/head strides, contiguous D); out [T, H, D] float32.
 * Request i owns tokens qsl[i]..qsl[i+1]-1 at positions seq_lens[i]-n..seq_lens[i]-1 (causal; optional
 * sliding window: a query at p sees keys p-window+1..p).
 *
 * Work item = (request, KV head, query tile[, KV split]). A tile holds up to RMAX rows = query tokens x
 * the G query heads sharing the KV head, so each K/V block is loaded once per tile: decode rows are one
 * token x G heads. When there are too few items to keep the threads busy (batch 1, long context), the
 * key range of each item is split and the partial (max, sum, acc) are merged afterwards (split-K).
 * Per block: S = Q K^T (scaled), masked, online-softmax update, acc += P V. The AVX2 path needs D % 8 == 0;
 * everything else runs the plain-C path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "kernels.h"
#include "simd.h"
#include "attention_avx512.h"

#define RMAX 24             /* rows (query tokens x heads of one KV head) per tile */
#define MIN_SPLIT_KEYS 128  /* fewest keys per split-K piece */
#define ITEMS_PER_THREAD 4  /* split when there are fewer items than this per thread */
#define CHUNK_KEYS 64       /* keys per online-softmax update (whole blocks) */
#define MAX_CHUNK_BLOCKS 128

static inline int chunk_blocks(int bs) {
    int n = CHUNK_KEYS / bs;
    return n < 1 ? 1 : (n > MAX_CHUNK_BLOCKS ? MAX_CHUNK_BLOCKS : n);
}

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3, KV_FP8 = 4 };
enum { OK = 0, E_NOMEM = -1, E_BLOCK = -2, E_DTYPE = -3, E_SHAPE = -4 };

typedef struct {
    const float *q; int64_t q_st, q_sh;
    const char *kv; int kv_dtype; const float *kv_scale; int64_t num_blocks; int bs, hkv, d;
    const int32_t *bt; int64_t bt_stride; int64_t bt_cols;
    const int32_t *seq_lens, *qsl; int num_reqs;
    int h; float scale; int window;
    float *out;
} Args;

/* part < 0: write out directly; kvh < 0: every KV head of a one-token (decode) item, so the item reads each token's
 * whole K/V row (all heads) in one contiguous pass instead of one head's slice per item */
typedef struct { int req, kvh, q0, nq, k0, k1, part; } Item;
typedef struct { int req, kvh, q0, nq, first, nsplit; } Group;       /* split-K pieces to merge */

typedef struct { float *qt, *s, *acc, *m, *l, *kb, *vb; } Scratch;

/* 2: the library also exports tm_prefill_attention; 3: tm_paged_attention_kv (int8 / fp8 pools with scales) */
int tm_attention_abi_version(void) { return 3; }

static inline int kv_esize(int kv_dtype) { return kv_dtype == KV_F32 ? 4 : (kv_dtype >= KV_I8 ? 1 : 2); }
static inline int kv_quantized(int kv_dtype) { return kv_dtype == KV_I8 || kv_dtype == KV_FP8; }

int tm_kv_dtype_supported(int kv_dtype) {
    if (kv_dtype == KV_F32 || kv_dtype == KV_BF16 || kv_quantized(kv_dtype)) return 1;
#ifdef __FLT16_MAX__
    if (kv_dtype == KV_F16) return 1;
#endif
    return 0;
}

/* K/V of this dtype and head dim are read straight from the pool by the SIMD kernels (float32: always;
 * bfloat16, int8, fp8: the AVX-512 kernels, D % 16 == 0); otherwise each chunk is first converted (dequantized)
 * into float32 scratch */
static inline int kv_in_place(int kv_dtype, int d) {
#ifdef TM_AVX512
    if (kv_dtype == KV_BF16 || kv_quantized(kv_dtype)) return d % 16 == 0;
#endif
    (void)d;
    return kv_dtype == KV_F32;
}

int tm_kv_read_in_place(int kv_dtype, int d) { return tm_kv_dtype_supported(kv_dtype) && kv_in_place(kv_dtype, d); }

/* ---------------------------------------------------------------- element conversion */
/* one fp8 e4m3 (fn: no infinities; 0x7f / 0xff are NaN, never written: the cache saturates at +-448) as float */
static inline float e4m3_to_f32(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float v = e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9);
    return (b & 0x80) ? -v : v;
}

static void to_f32(float *dst, const char *src, int64_t src_stride, int nrows, int d, int dtype, const float *sc,
                   int64_t sc_stride, int hd) {
    /* nrows rows of d elements, row stride src_stride elements -> dst [nrows, d]; quantized dtypes: head x (hd
     * elements) of row j is scaled by sc[j * sc_stride + x / hd] */
    for (int j = 0; j < nrows; j++) {
        float *o = dst + (int64_t)j * d;
        if (dtype == KV_I8 || dtype == KV_FP8) {
            const uint8_t *s = (const uint8_t *)src + j * src_stride;
            for (int x = 0; x < d; x++) {
                const float f = sc[j * sc_stride + x / hd];
                o[x] = (dtype == KV_I8 ? (float)(int8_t)s[x] : e4m3_to_f32(s[x])) * f;
            }
        } else if (dtype == KV_BF16) {
            const uint16_t *s = (const uint16_t *)src + j * src_stride;
            for (int x = 0; x < d; x++) {
                uint32_t u = (uint32_t)s[x] << 16;
                float f;
                memcpy(&f, &u, 4);
                o[x] = f;
            }
        }
#ifdef __FLT16_MAX__
        else if (dtype == KV_F16) {
            const _Float16 *s = (const _Float16 *)src + j * src_stride;
            for (int x = 0; x < d; x++) o[x] = (float)s[x];
        }
#endif
    }
}

/* ---------------------------------------------------------------- AVX2 micro-kernels */
#ifdef __AVX2__
/* Scores of NR query rows x 4 keys: each K load feeds NR rows, each Q load 4 keys (NR constant after inlining) */
static inline __attribute__((always_inline)) void scores_rows(const int NR, float *S, int sst, const float *Q,
                                                              const float *K, int64_t kst, int nk, int D) {
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        const float *k0 = K + j * kst;
        __m256 c[3][4];
        for (int i = 0; i < NR; i++)
            for (int u = 0; u < 4; u++) c[i][u] = _mm256_setzero_ps();
        for (int x = 0; x < D; x += 8) {
            __m256 kv[4];
            for (int u = 0; u < 4; u++) kv[u] = _mm256_loadu_ps(k0 + u * kst + x);
            for (int i = 0; i < NR; i++) {
                __m256 qv = _mm256_loadu_ps(Q + i * D + x);
                for (int u = 0; u < 4; u++) c[i][u] = _mm256_fmadd_ps(qv, kv[u], c[i][u]);
            }
        }
        for (int i = 0; i < NR; i++) {
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(c[i][0], c[i][1]), _mm256_hadd_ps(c[i][2], c[i][3]));
            _mm_storeu_ps(S + i * sst + j, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        }
    }
    for (; j < nk; j++) {
        const float *kj = K + j * kst;
        for (int i = 0; i < NR; i++) {
            __m256 a = _mm256_setzero_ps();
            for (int x = 0; x < D; x += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(Q + i * D + x), _mm256_loadu_ps(kj + x), a);
            S[i * sst + j] = hsum8(a);
        }
    }
}

/* S[r, j] = Q[r] . K[j] for r < R, j < nk (Q rows contiguous, K row stride kst) */
static void scores_avx2(float *S, int sst, const float *Q, int R, const float *K, int64_t kst, int nk, int D) {
    int r = 0;
    for (; r + 3 <= R; r += 3) scores_rows(3, S + (int64_t)r * sst, sst, Q + (int64_t)r * D, K, kst, nk, D);
    if (R - r == 2) scores_rows(2, S + (int64_t)r * sst, sst, Q + (int64_t)r * D, K, kst, nk, D);
    if (R - r == 1) scores_rows(1, S + (int64_t)r * sst, sst, Q + (int64_t)r * D, K, kst, nk, D);
}

/* acc[i, x:x+8W] += sum_j P[i, j] V[j, x:x+8W] for NR rows (NR, W constants after inlining: registers only) */
static inline __attribute__((always_inline)) void pv_tile(const int NR, const int W, float *acc, const float *P,
                                                          int pst, const float *V, int64_t vst, int nk, int D, int x) {
    __m256 c[3][4];
    for (int i = 0; i < NR; i++)
        for (int w = 0; w < W; w++) c[i][w] = _mm256_loadu_ps(acc + i * D + x + 8 * w);
    for (int j = 0; j < nk; j++) {
        __m256 v[4];
        for (int w = 0; w < W; w++) v[w] = _mm256_loadu_ps(V + j * vst + x + 8 * w);
        for (int i = 0; i < NR; i++) {
            __m256 b = _mm256_broadcast_ss(P + i * pst + j);
            for (int w = 0; w < W; w++) c[i][w] = _mm256_fmadd_ps(b, v[w], c[i][w]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int w = 0; w < W; w++) _mm256_storeu_ps(acc + i * D + x + 8 * w, c[i][w]);
}

static inline __attribute__((always_inline)) void pv_rows(const int NR, float *acc, const float *P, int pst,
                                                          const float *V, int64_t vst, int nk, int D) {
    int x = 0;
    for (; x + 32 <= D; x += 32) pv_tile(NR, 4, acc, P, pst, V, vst, nk, D, x);
    if (x + 16 <= D) { pv_tile(NR, 2, acc, P, pst, V, vst, nk, D, x); x += 16; }
    if (x + 8 <= D) pv_tile(NR, 1, acc, P, pst, V, vst, nk, D, x);
}

static void pv_avx2(float *acc, const float *P, int pst, int R, const float *V, int64_t vst, int nk, int D) {
    int r = 0;
    for (; r + 3 <= R; r += 3) pv_rows(3, acc + (int64_t)r * D, P + r * pst, pst, V, vst, nk, D);
    if (R - r == 2) pv_rows(2, acc + (int64_t)r * D, P + r * pst, pst, V, vst, nk, D);
    if (R - r == 1) pv_rows(1, acc + (int64_t)r * D, P + r * pst, pst, V, vst, nk, D);
}
#endif

/* ---------------------------------------------------------------- plain-C micro-kernels */
static void scores_c(float *S, int sst, const float *Q, int R, const float *K, int64_t kst, int nk, int D) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < nk; j++) {
            float a = 0.f;
            for (int x = 0; x < D; x++) a += Q[(int64_t)r * D + x] * K[j * kst + x];
            S[(int64_t)r * sst + j] = a;
        }
}

static void pv_c(float *acc, const float *P, int pst, int R, const float *V, int64_t vst, int nk, int D) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < nk; j++) {
            float p = P[r * pst + j];
            for (int x = 0; x < D; x++) acc[(int64_t)r * D + x] += p * V[j * vst + x];
        }
}

/* S[r, j] *= sp[j * stride] * mul for rr rows of nk columns (quantized K: the key scales of the score columns;
 * quantized V: the value scales of the probabilities) */
static void scale_cols(float *S, int sst, int rr, int nk, const float *sp, int64_t stride, float mul) {
    for (int j = 0; j < nk; j++) {
        const float f = sp[j * stride] * mul;
        for (int r = 0; r < rr; r++) S[(int64_t)r * sst + j] *= f;
    }
}

/* Row softmax update over nk scores s (valid j in [lo, hi)); returns alpha = exp(m_old - m_new), or -1 when the
 * row sees no key in this block (s zeroed, nothing else changed). */
static float softmax_row(float *s, int nk, int lo, int hi, float *m, float *l) {
    if (lo >= hi) {
        memset(s, 0, sizeof(float) * nk);
        return -1.f;
    }
    float mx = s[lo];
    int j0 = lo;
#ifdef __AVX2__
    if (hi - lo >= 8) {
        __m256 mv = _mm256_loadu_ps(s + lo);
        for (j0 = lo + 8; j0 + 8 <= hi; j0 += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j0));
        __m128 x = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
        x = _mm_max_ps(x, _mm_movehl_ps(x, x));
        x = _mm_max_ss(x, _mm_movehdup_ps(x));
        mx = _mm_cvtss_f32(x);
    }
#endif
    for (int j = j0; j < hi; j++) mx = s[j] > mx ? s[j] : mx;
    float mnew = mx > *m ? mx : *m;
    float alpha = (*m == -INFINITY) ? 0.f : expf(*m - mnew);
    float sum = 0.f;
    int j = lo;
#ifdef __AVX2__
    __m256 mv = _mm256_set1_ps(mnew), acc = _mm256_setzero_ps();
    for (; j + 8 <= hi; j += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, p);
        acc = _mm256_add_ps(acc, p);
    }
    sum = hsum8(acc);
#endif
    for (; j < hi; j++) {
        s[j] = expf(s[j] - mnew);
        sum += s[j];
    }
    for (j = 0; j < lo; j++) s[j] = 0.f;
    for (j = hi; j < nk; j++) s[j] = 0.f;
    *l = *l * alpha + sum;
    *m = mnew;
    return alpha;
}

/* ---------------------------------------------------------------- one work item */
/* Software prefetch of a thread's decode stream. A decode reads each K/V block once (memory-bound), and the blocks
 * are scattered over the pool, out of the hardware prefetcher's sight: without help a core alternates computing a
 * chunk and stalling on the next (one layer's 64-decode call ran at ~compute + transfer time). The frontier walks
 * the blocks of the thread's items in the order they will be computed, across item boundaries, and stays
 * pf_blocks() blocks ahead of the computation, asking for them into L2. For whole-row (all KV heads) items it
 * advances a few lines before each micro-kernel call (its share of the block), not a chunk of blocks at once: with
 * bursts of a chunk's ~800 lines the loads and the arithmetic overlapped less (a 64-decode layer call took ~1.0 ms
 * instead of ~0.75-0.85, bench/results/s20). One-head items (split-K, batch 1) still advance a chunk at a time.
 * The distance is in bytes: SmolLM2's bf16 blocks (3 KV heads x 64) are 12 KiB of K and V, 12 of them ahead kept a
 * 64-decode step at the transfer time, but OLMoE's (16 x 128) are 128 KiB, and 12 ahead (1.5 MiB, with the chunk
 * being computed) overflowed the 2 MiB L2: 64 decodes at ~300 tokens ran at 12.5 GB/s with 6-12 blocks ahead, 18.6
 * with 1 (/tmp attention micro-benchmark, 16 x 128 heads, bf16 pool; 2 blocks 16.7, 3 15.7). */
#define PF_BYTES (160 * 1024)
#define PF_MAX_BLOCKS 12
typedef struct { const Item *items; int64_t n, i; int b, c; } Prefetch; /* next: line c of block b */

/* how many blocks the frontier runs ahead: PF_BYTES of K and V (of the heads an item reads), 1 to PF_MAX_BLOCKS */
static int pf_blocks(const Args *a, int nh) {
    const int64_t per_block = 2 * (int64_t)a->bs * nh * a->d * kv_esize(a->kv_dtype);
    const int64_t n = PF_BYTES / (per_block > 0 ? per_block : 1);
    return n < 1 ? 1 : (n > PF_MAX_BLOCKS ? PF_MAX_BLOCKS : (int)n);
}

/* Issue the frontier's next nlines cache-line prefetches (line by line through the block's tokens, each K line with
 * its V line), crossing block and item boundaries. */
static void pf_lines(const Args *a, Prefetch *pf, int64_t nlines) {
    const int BS = a->bs;
    const int esize = kv_esize(a->kv_dtype);
    const int64_t kst_pool = (int64_t)a->hkv * a->d;
    const int64_t plane = a->num_blocks * a->bs * kst_pool * esize;
    while (nlines > 0 && pf->i < pf->n) {
        const Item *it = &pf->items[pf->i];
        const int kb = it->k0 / BS + pf->b;
        if (kb * BS >= it->k1) { pf->i++; pf->b = 0; pf->c = 0; continue; }
        const int nh = it->kvh < 0 ? a->hkv : 1, kvh0 = it->kvh < 0 ? 0 : it->kvh;
        const int32_t blk = a->bt[(int64_t)it->req * a->bt_stride + kb];
        const char *kp = a->kv + (((int64_t)blk * BS) * kst_pool + (int64_t)kvh0 * a->d) * esize;
        const int64_t row = kst_pool * esize, span = (int64_t)nh * a->d * esize;
        const int lpt = (int)((span + 63) / 64), nl = BS * lpt;
        int c = pf->c;
        if (c == 0 && a->kv_dtype == KV_I8) { /* the block's int8 scales (K and V planes), BS * hkv floats each */
            const float *sk = a->kv_scale + (int64_t)blk * BS * a->hkv;
            const int64_t splane = a->num_blocks * BS * a->hkv;
            for (int64_t x = 0; x < (int64_t)BS * a->hkv; x += 16) {
                __builtin_prefetch(sk + x, 0, 2);
                __builtin_prefetch(sk + splane + x, 0, 2);
            }
        }
        if (span == row) /* whole rows: the block's K (and V) lines are contiguous */
            for (; c < nl && nlines > 0; c++, nlines -= 2) {
                __builtin_prefetch(kp + (int64_t)c * 64, 0, 2); /* read, into L2 (prefetcht1) */
                __builtin_prefetch(kp + plane + (int64_t)c * 64, 0, 2);
            }
        else /* one head's slice of each row: token t, line x of the slice (no division per line) */
            for (int t = c / lpt, x = c - t * lpt; c < nl && nlines > 0; c++, nlines -= 2) {
                const char *p = kp + t * row + (int64_t)x * 64;
                __builtin_prefetch(p, 0, 2);
                __builtin_prefetch(p + plane, 0, 2);
                if (++x == lpt) { x = 0; t++; }
            }
        if (c == nl) { pf->b++; c = 0; }
        pf->c = c;
    }
}

/* lines of one block of this item's K and V (what the frontier advances per block consumed) */
static inline int64_t pf_block_lines(const Args *a, const Item *it) {
    const int nh = it->kvh < 0 ? a->hkv : 1, esize = kv_esize(a->kv_dtype);
    return 2 * (int64_t)a->bs * (((int64_t)nh * a->d * esize + 63) / 64);
}

static void pf_issue(const Args *a, Prefetch *pf, int nblocks) {
    if (pf->i < pf->n) pf_lines(a, pf, nblocks * pf_block_lines(a, &pf->items[pf->i]));
}

static void run_item(const Args *a, const Item *it, Scratch *sc, float *pacc, float *pm, float *pl, int rows_alloc,
                     Prefetch *pf) {
    const int G = a->h / a->hkv, D = a->d, BS = a->bs;
    const int n = a->qsl[it->req + 1] - a->qsl[it->req], L = a->seq_lens[it->req];
    const int64_t t0 = a->qsl[it->req] + it->q0;
    const int nh = it->kvh < 0 ? a->hkv : 1, kvh0 = it->kvh < 0 ? 0 : it->kvh; /* nh > 1 only when nq == 1 */
    const int GH = G * nh;                                                      /* rows per query token */
    const int R = it->nq * GH;
    const int pos0 = L - n + it->q0; /* position of the tile's first query */
    const int64_t kst_pool = (int64_t)a->hkv * D;
    const int64_t plane = a->num_blocks * a->bs * kst_pool; /* elements of the K (or V) half */
    const int esize = kv_esize(a->kv_dtype);
    const int32_t *table = a->bt + (int64_t)it->req * a->bt_stride;
    int use_avx = 0, use512 = 0;
#ifdef __AVX2__
    use_avx = (D % 8) == 0;
#endif
#ifdef TM_AVX512
    /* float32 / bfloat16 K/V read in place by the AVX-512 kernels (no conversion into scratch) */
    use512 = (D % 16) == 0 && a->kv_dtype != KV_F16;
#endif
    const int direct = kv_in_place(a->kv_dtype, D);
    /* quantized pools: scales of consecutive keys sc_stride apart (int8: hkv; fp8: one per head, 0); the in-register
     * fp8 loads give 2^-8 of the value (attention_avx512.h), so their scale is multiplied by qmul = 256 */
    const int quant = kv_quantized(a->kv_dtype);
    const int64_t sc_stride = a->kv_dtype == KV_I8 ? a->hkv : 0;
    const float qmul = a->kv_dtype == KV_FP8 && direct ? 256.f : 1.f;
    Prefetch own; /* a decode item of a dynamically scheduled step prefetches its own blocks ahead */
    if (!pf && it->nq == 1) {
        own = (Prefetch){it, 1, 0, 0, 0};
        pf_issue(a, &own, pf_blocks(a, nh));
        pf = &own;
    }

    for (int jq = 0; jq < it->nq; jq++)
        for (int g = 0; g < GH; g++) {
            const float *src = a->q + (t0 + jq) * a->q_st + (int64_t)(kvh0 * G + g) * a->q_sh;
            float *dst = sc->qt + (int64_t)(jq * GH + g) * D;
            for (int x = 0; x < D; x++) dst[x] = src[x] * a->scale;
        }
    for (int r = 0; r < R; r++) { sc->m[r] = -INFINITY; sc->l[r] = 0.f; }
    memset(sc->acc, 0, sizeof(float) * (size_t)R * D);

    const int nbc = chunk_blocks(BS), sst = nbc * BS;
    for (int kb0 = it->k0 / BS; kb0 * BS < it->k1; kb0 += nbc) {
        /* one chunk of up to nbc blocks: scores of every block, one softmax update, then P V */
        const char *Ks[MAX_CHUNK_BLOCKS], *Vs[MAX_CHUNK_BLOCKS];
        const float *KSc[MAX_CHUNK_BLOCKS], *VSc[MAX_CHUNK_BLOCKS]; /* quantized: the scales of each block's keys */
        int cols[MAX_CHUNK_BLOCKS + 1], nblk = 0;
        const int cs = kb0 * BS > it->k0 ? kb0 * BS : it->k0;
        int64_t kst = kst_pool;
        cols[0] = 0;
        for (int kb = kb0; kb < kb0 + nbc && kb * BS < it->k1; kb++, nblk++) {
            const int ks = kb * BS > it->k0 ? kb * BS : it->k0;
            const int ke = kb * BS + BS < it->k1 ? kb * BS + BS : it->k1;
            const int64_t off = ((int64_t)table[kb] * BS + (ks - kb * BS)) * kst_pool + (int64_t)kvh0 * D;
            cols[nblk + 1] = cols[nblk] + (ke - ks);
            if (quant) { /* int8: per (token, head) scales beside the pool; fp8: per head */
                KSc[nblk] = a->kv_dtype == KV_I8 ? a->kv_scale + off / D : a->kv_scale + kvh0;
                VSc[nblk] = a->kv_dtype == KV_I8 ? a->kv_scale + (plane + off) / D : a->kv_scale + a->hkv + kvh0;
            }
            if (direct) {
                Ks[nblk] = a->kv + off * esize;
                Vs[nblk] = a->kv + (plane + off) * esize;
            } else { /* convert (dequantize) into one contiguous [keys, nh * D] chunk */
                to_f32(sc->kb + (int64_t)cols[nblk] * nh * D, a->kv + off * esize, kst_pool, ke - ks, nh * D,
                       a->kv_dtype, quant ? KSc[nblk] : NULL, sc_stride, D);
                to_f32(sc->vb + (int64_t)cols[nblk] * nh * D, a->kv + (plane + off) * esize, kst_pool, ke - ks,
                       nh * D, a->kv_dtype, quant ? VSc[nblk] : NULL, sc_stride, D);
            }
        }
        if (!direct) {
            Ks[0] = (const char *)sc->kb; Vs[0] = (const char *)sc->vb; kst = (int64_t)nh * D;
            cols[1] = cols[nblk];
            nblk = 1;
        }
        /* keep the decode stream's prefetch frontier pf_blocks() ahead of the blocks this chunk consumes: one-head
         * items a chunk at once; whole-row items by each of the 2 x nh micro-kernel calls per block, its share */
        int64_t pf_step = 0;
        if (pf && nh == 1) pf_issue(a, pf, nblk);
        else if (pf) pf_step = (pf_block_lines(a, it) + 2 * nh - 1) / (2 * nh);
        const int nk = cols[nblk];
        const int hsz = D * (direct ? esize : 4); /* bytes between two heads' slices of a K/V row */
        for (int b = 0; b < nblk; b++)
            for (int hh = 0; hh < nh; hh++) {
                /* rows of head hh: all nq x G rows for a one-head item, the G rows hh*G.. of an all-heads item */
                float *S = sc->s + (int64_t)hh * G * sst + cols[b];
                const float *Q = sc->qt + (int64_t)hh * G * D;
                const char *K = Ks[b] + (int64_t)hh * hsz;
                const int rr = nh > 1 ? G : R, nkb = cols[b + 1] - cols[b];
                if (pf_step) pf_lines(a, pf, pf_step);
#ifdef TM_AVX512
                if (use512) scores512(S, sst, Q, rr, K, kst, nkb, D, a->kv_dtype);
                else
#endif
#ifdef __AVX2__
                if (use_avx) scores_avx2(S, sst, Q, rr, (const float *)K, kst, nkb, D);
                else
#endif
                    scores_c(S, sst, Q, rr, (const float *)K, kst, nkb, D);
                if (quant && direct) scale_cols(S, sst, rr, nkb, KSc[b] + hh, sc_stride, qmul);
            }
        for (int r = 0; r < R; r++) {
            const int p = pos0 + r / GH;
            int lo = 0, hi = p - cs + 1; /* valid keys cs+lo .. cs+hi-1 */
            if (hi > nk) hi = nk;
            if (a->window > 0 && p - a->window + 1 - cs > 0) lo = p - a->window + 1 - cs;
            float alpha = softmax_row(sc->s + (int64_t)r * sst, nk, lo, hi, &sc->m[r], &sc->l[r]);
            if (alpha >= 0.f && alpha != 1.f) {
                float *ar = sc->acc + (int64_t)r * D;
                for (int x = 0; x < D; x++) ar[x] *= alpha;
            }
        }
        for (int b = 0; b < nblk; b++)
            for (int hh = 0; hh < nh; hh++) {
                float *acc = sc->acc + (int64_t)hh * G * D;
                float *P = sc->s + (int64_t)hh * G * sst + cols[b];
                const char *V = Vs[b] + (int64_t)hh * hsz;
                const int rr = nh > 1 ? G : R, nkb = cols[b + 1] - cols[b];
                if (pf_step) pf_lines(a, pf, pf_step);
                if (quant && direct) scale_cols(P, sst, rr, nkb, VSc[b] + hh, sc_stride, qmul);
#ifdef TM_AVX512
                if (use512) pv512(acc, P, sst, rr, V, kst, nkb, D, a->kv_dtype);
                else
#endif
#ifdef __AVX2__
                if (use_avx) pv_avx2(acc, P, sst, rr, (const float *)V, kst, nkb, D);
                else
#endif
                    pv_c(acc, P, sst, rr, (const float *)V, kst, nkb, D);
            }
    }

    if (it->part < 0) {
        for (int jq = 0; jq < it->nq; jq++)
            for (int g = 0; g < GH; g++) {
                const int r = jq * GH + g;
                float *o = a->out + ((t0 + jq) * a->h + kvh0 * G + g) * (int64_t)D;
                const float inv = 1.f / sc->l[r];
                for (int x = 0; x < D; x++) o[x] = sc->acc[(int64_t)r * D + x] * inv;
            }
    } else {
        const int64_t base = (int64_t)it->part * rows_alloc;
        memcpy(pacc + base * D, sc->acc, sizeof(float) * (size_t)R * D);
        memcpy(pm + base, sc->m, sizeof(float) * R);
        memcpy(pl + base, sc->l, sizeof(float) * R);
    }
}

static void merge_group(const Args *a, const Group *g, const float *pacc, const float *pm, const float *pl,
                        int rows_alloc) {
    const int G = a->h / a->hkv, D = a->d;
    const int64_t t0 = a->qsl[g->req] + g->q0;
    for (int jq = 0; jq < g->nq; jq++)
        for (int gg = 0; gg < G; gg++) {
            const int r = jq * G + gg;
            float M = -INFINITY;
            for (int s = 0; s < g->nsplit; s++) {
                float ms = pm[(int64_t)(g->first + s) * rows_alloc + r];
                M = ms > M ? ms : M;
            }
            float *o = a->out + ((t0 + jq) * a->h + g->kvh * G + gg) * (int64_t)D;
            float den = 0.f;
            for (int x = 0; x < D; x++) o[x] = 0.f;
            for (int s = 0; s < g->nsplit; s++) {
                const int64_t idx = (int64_t)(g->first + s) * rows_alloc + r;
                if (pm[idx] == -INFINITY) continue;
                const float w = expf(pm[idx] - M);
                den += w * pl[idx];
                const float *ac = pacc + idx * D;
                for (int x = 0; x < D; x++) o[x] += w * ac[x];
            }
            const float inv = 1.f / den;
            for (int x = 0; x < D; x++) o[x] *= inv;
        }
}

/* ---------------------------------------------------------------- entry points */
int tm_paged_attention(const float *q, int64_t q_st, int64_t q_sh,
                       const void *kv, int kv_dtype, int64_t num_blocks, int block_size, int hkv, int d,
                       const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                       const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                       int h, float scale, int window, float *out) {
    if (kv_quantized(kv_dtype)) return E_DTYPE; /* needs its scales: tm_paged_attention_kv */
    return tm_paged_attention_kv(q, q_st, q_sh, kv, kv_dtype, NULL, num_blocks, block_size, hkv, d, block_tables,
                                 bt_stride, bt_cols, seq_lens, qsl, num_reqs, h, scale, window, out);
}

int tm_paged_attention_kv(const float *q, int64_t q_st, int64_t q_sh,
                          const void *kv, int kv_dtype, const float *kv_scale, int64_t num_blocks, int block_size,
                          int hkv, int d, const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                          const int32_t *seq_lens, const int32_t *qsl, int num_reqs,
                          int h, float scale, int window, float *out) {
    if (!tm_kv_dtype_supported(kv_dtype) || (kv_quantized(kv_dtype) && !kv_scale)) return E_DTYPE;
    if (hkv <= 0 || h % hkv || d <= 0 || block_size <= 0 || num_reqs < 0 || window < 0) return E_SHAPE;
    Args a = {q, q_st, q_sh, (const char *)kv, kv_dtype, kv_scale, num_blocks, block_size, hkv, d, block_tables,
              bt_stride, bt_cols, seq_lens, qsl, num_reqs, h, scale, window, out};
    const int G = h / hkv;
    const int tq = RMAX / G > 1 ? RMAX / G : 1;
    const int rows_alloc = tq * G;

    /* validate and count base items (request x KV head x query tile) */
    int64_t nbase = 0, ndecode = 0;
    for (int i = 0; i < num_reqs; i++) {
        const int n = qsl[i + 1] - qsl[i], L = seq_lens[i];
        if (n < 0 || L < n) return E_SHAPE;
        const int64_t nblk = ((int64_t)L + block_size - 1) / block_size;
        if (nblk > bt_cols) return E_SHAPE;
        for (int64_t b = 0; b < nblk; b++) {
            const int32_t id = block_tables[i * bt_stride + b];
            if (id < 0 || id >= num_blocks) return E_BLOCK;
        }
        nbase += (int64_t)hkv * ((n + tq - 1) / tq);
        ndecode += n == 1;
    }
    if (nbase == 0) return OK;
    const int nthreads = omp_get_max_threads();
    int target = 1;
    if (nbase < (int64_t)ITEMS_PER_THREAD * nthreads) target = (int)((ITEMS_PER_THREAD * nthreads + nbase - 1) / nbase);
    /* enough decodes to keep the threads busy: one item per decode covers all its KV heads (contiguous rows) */
    const int decode_all_heads = hkv > 1 && target == 1 && ndecode >= (int64_t)ITEMS_PER_THREAD * nthreads;

    /* build the work list: prefill requests first (the long items), then decodes */
    int64_t cap = nbase * target;
    Item *items = malloc(sizeof(Item) * cap);
    Group *groups = malloc(sizeof(Group) * nbase);
    if (!items || !groups) { free(items); free(groups); return E_NOMEM; }
    int64_t ni = 0, ng = 0, nparts = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < num_reqs; i++) {
            const int n = qsl[i + 1] - qsl[i], L = seq_lens[i];
            if (n == 0 || (pass == 0) != (n > 1)) continue;
            if (n == 1 && decode_all_heads) {
                const int k0 = (window > 0 && L - window > 0) ? L - window : 0;
                items[ni++] = (Item){i, -1, 0, 1, k0, L, -1};
                continue;
            }
            for (int kvh = 0; kvh < hkv; kvh++)
                for (int q0 = 0; q0 < n; q0 += tq) {
                    const int nq = n - q0 < tq ? n - q0 : tq;
                    const int p0 = L - n + q0, p1 = p0 + nq - 1;
                    const int k0 = (window > 0 && p0 - window + 1 > 0) ? p0 - window + 1 : 0, k1 = p1 + 1;
                    int ns = target;
                    if (ns > (k1 - k0) / MIN_SPLIT_KEYS) ns = (k1 - k0) / MIN_SPLIT_KEYS;
                    if (ns <= 1) {
                        items[ni++] = (Item){i, kvh, q0, nq, k0, k1, -1};
                        continue;
                    }
                    int chunk = (k1 - k0 + ns - 1) / ns;
                    chunk = (chunk + block_size - 1) / block_size * block_size;
                    ns = (k1 - k0 + chunk - 1) / chunk;
                    groups[ng++] = (Group){i, kvh, q0, nq, (int)nparts, ns};
                    for (int s = 0; s < ns; s++) {
                        const int a0 = k0 + s * chunk, a1 = a0 + chunk < k1 ? a0 + chunk : k1;
                        items[ni++] = (Item){i, kvh, q0, nq, a0, a1, (int)nparts++};
                    }
                }
        }
    float *pacc = NULL, *pm = NULL, *pl = NULL;
    if (nparts) {
        pacc = malloc(sizeof(float) * nparts * rows_alloc * d);
        pm = malloc(sizeof(float) * nparts * rows_alloc);
        pl = malloc(sizeof(float) * nparts * rows_alloc);
        if (!pacc || !pm || !pl) { free(pacc); free(pm); free(pl); free(items); free(groups); return E_NOMEM; }
    }
    int err = OK;
    /* a step of decodes only (one all-heads item each): split the items into nthreads contiguous runs of about
     * equal key counts, so each thread knows the blocks it reads next (split_at[t]: first item of thread t + 1) */
    int64_t *split_at = NULL;
    if (decode_all_heads && ni == ndecode && nthreads > 1 && !nparts) {
        split_at = malloc(sizeof(int64_t) * nthreads);
        if (!split_at) { free(pacc); free(pm); free(pl); free(items); free(groups); return E_NOMEM; }
        int64_t total = 0, run = 0, w = 0;
        for (int64_t i = 0; i < ni; i++) total += items[i].k1 - items[i].k0;
        for (int t = 0; t < nthreads - 1; t++) {
            const int64_t goal = total * (t + 1) / nthreads;
            while (w < ni && run + (items[w].k1 - items[w].k0) / 2 < goal) run += items[w].k1 - items[w++].k0;
            split_at[t] = w;
        }
    }
#pragma omp parallel num_threads(nthreads)
    {
        Scratch sc = {0};
        const size_t sst = (size_t)chunk_blocks(block_size) * block_size;
        const size_t srows = (size_t)(rows_alloc > h ? rows_alloc : h); /* all-heads decode items hold h rows */
        const size_t rd = srows * d, bd = sst * d * hkv;
        float *mem = malloc(sizeof(float) * (2 * rd + srows * sst + 2 * srows + 2 * bd));
        if (!mem) {
#pragma omp atomic write
            err = E_NOMEM;
        } else {
            sc.qt = mem; sc.acc = mem + rd; sc.s = mem + 2 * rd; sc.m = sc.s + srows * sst;
            sc.l = sc.m + srows; sc.kb = sc.l + srows; sc.vb = sc.kb + bd;
        }
        if (split_at) { /* all decodes: each thread a contiguous run of items with half the keys, prefetched */
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t lo = t == 0 ? 0 : split_at[t - 1], hi = t == nt - 1 ? ni : split_at[t];
            Prefetch pf = {items + lo, hi - lo, 0, 0, 0};
            pf_issue(&a, &pf, pf_blocks(&a, hi > lo && items[lo].kvh < 0 ? hkv : 1));
            for (int64_t w = lo; w < hi; w++)
                if (mem) run_item(&a, &items[w], &sc, pacc, pm, pl, rows_alloc, &pf);
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t w = 0; w < ni; w++)
                if (mem) run_item(&a, &items[w], &sc, pacc, pm, pl, rows_alloc, NULL);
        }
        free(mem);
    }
    if (err == OK && ng) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t w = 0; w < ng; w++) merge_group(&a, &groups[w], pacc, pm, pl, rows_alloc);
    }
    free(pacc); free(pm); free(pl); free(items); free(groups); free(split_at);
    return err;
}

// K and V of one sequence, gathered from a float32 paged cache [2][nb][bs][row] (row = Hkv * D floats a token)
// into bfloat16 [2][seq_len][row] in one pass (round to nearest even): what a bf16 SDPA over a cached prefix
// reads, without a float32 gather copy and a second conversion pass. Returns 0, -2 block id out of range.
int tm_gather_kv_bf16(const float *kv, int64_t nb, int bs, int64_t row, const int32_t *block_ids, int64_t seq_len,
                      uint16_t *out) {
    const int64_t nblk = (seq_len + bs - 1) / bs;
    for (int64_t b = 0; b < nblk; b++)
        if (block_ids[b] < 0 || block_ids[b] >= nb) return -2;
#pragma omp parallel for schedule(static) collapse(2) if (seq_len * row >= (1 << 15))
    for (int64_t s = 0; s < 2; s++) {
        for (int64_t t = 0; t < seq_len; t++) {
            const float *src = kv + ((s * nb + block_ids[t / bs]) * bs + t % bs) * row;
            uint16_t *dst = out + (s * seq_len + t) * row;
            int64_t i = 0;
#if defined(__AVX512BF16__)
            for (; i + 32 <= row; i += 32)
                _mm512_storeu_si512((void *)(dst + i), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16),
                                                                                    _mm512_loadu_ps(src + i)));
#endif
            for (; i < row; i++) {
                uint32_t u;
                memcpy(&u, src + i, 4);
                dst[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            }
        }
    }
    return 0;
}
