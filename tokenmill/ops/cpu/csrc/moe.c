// Fused mixture-of-experts over packed GGUF experts, one call per layer (tokenmill/ops/moe/cpu.py). The reference
// is tokenmill/ops/moe/reference.py; the grouped PyTorch path (ops/moe/cpu.py) computes the same thing per expert.
//
//   pairs (t, k) sorted by expert (counting sort, stable) -> xs = x[t] gathered per pair
//   g = xs @ gate_up[e]^T   for each expert's run of pairs      [P, 2I]
//   a = silu(g[:, :I]) * g[:, I:]                               [P, I]
//   y = a @ down[e]^T                                           [P, H]
//   out[t] = sum_k w[t, k] * y[pair (t, k)]                     [T, H]
//
// The GEMMs run as tasks (expert, tile of output rows) spread over the threads, each task one kernel call on the
// expert's packed rows (its own OpenMP region then runs single-threaded inside ours): threads over experts and
// rows, no dense copy of any weight. Which kernel an expert's tasks call depends on its rows (gemm auto, k-quants):
// below amx_i8_min_m the VNNI int8 tiles, up to i8_max_m the AMX int8 tiles (qlinear_amx_i8.c), more rows
// qlinear_f32 (its AMX bf16 path); under exact float32 always qlinear_f32. A build without AMX but with AVX512-BF16
// (Zen 4) runs those many-row experts' tasks on qlinear_bf16.c's panels instead, dequantized per task (prepare_bf16). Any block type qlinear_f32 takes works
// here, and gate|up and down may differ (llama.cpp's Q4_K_M keeps some layers' ffn_down_exps in Q6_K beside Q4_K
// gate / up).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "quant.h"
#include "simd.h"

#define TILE_N 64       // output rows per task
#define TILE_N_AMX 256  // ... for an expert whose rows take the AMX path: each call converts its rows of x to bf16
                        // once, so wider tasks convert them fewer times

typedef struct {
    int64_t e, n0, nc;
} task_t;

// tasks (expert, n0, nc) over the active experts' output rows [0, N) in tiles of TILE_N (TILE_N_AMX for an expert
// with amx_min_m rows or more, and more than i8_max_m, when amx_min_m > 0); returns the count
static int64_t make_tasks(const int64_t *count, int64_t E, int64_t N, int64_t i8_max_m, int64_t amx_min_m,
                          task_t *tasks) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        if (count[e] == 0) continue;
        const int64_t tile = amx_min_m > 0 && count[e] >= amx_min_m && count[e] > i8_max_m ? TILE_N_AMX : TILE_N;
        for (int64_t n0 = 0; n0 < N; n0 += tile) {
            tasks[n].e = e;
            tasks[n].n0 = n0;
            tasks[n].nc = N - n0 < tile ? N - n0 : tile;
            n++;
        }
    }
    return n;
}

// The rows of a that the int8 tiles will read (experts with 1..i8_max_m rows, gemm auto on an AVX512-VNNI build,
// k-quant weights), quantized once for all of their tasks instead of once per task; the rows of experts with more
// rows (prefill) take qlinear_f32 and are left alone. An expert of amx_i8_min_m rows or more (and at most i8_max_m)
// takes the AMX int8 tiles where built and granted: its rows also in their quad layout (xb from tile tb[e] on).
typedef struct {
    int8_t *xq, *xqv, *xb;
    float *xsc, *xs, *xsc2, *xs16, *xscT, *xsT;
    int64_t *tb;  // per expert: its first 16-row tile in xb, -1 where it takes the VNNI tiles
    // The rows of the experts that take the AMX bf16 tiles, rounded to bf16 once for all of their tasks (each task
    // converted them again): x16 [P + 16, K] (the rows in a's order; 16 rows of slack for the tiles' padding rows),
    // in the caller's scratch (x16_owned 0) or allocated; amx16[e] 1 for those experts.
    uint16_t *x16;
    int x16_owned;
    char *amx16;
    // No tile unit, AVX512-BF16 (Zen 4): the experts past the int8 rows (amx_min_m or more) whose tasks dequantize
    // their 64-256 output rows into bf16 panels (qlinear_bf16.c's layout) in a per-thread buffer and run them with
    // vdpbf16ps: no bf16 copy of any expert is kept. dot16[e] 1 for those experts.
    char *dot16;
} prepared_t;

static inline int i8_rows(int64_t m, int64_t i8_max_m) { return m <= i8_max_m; }

static int amx_i8_ok(int qtype) {
#if defined(TM_AMX_I8)
    return i8_direct_type(qtype) && tm_amx_enabled();
#else
    (void)qtype;
    return 0;
#endif
}

static int prepare(int qtype, const float *a, int64_t P, int64_t Kdim, const int64_t *start, const int64_t *count,
                   int64_t E, int64_t i8_max_m, int64_t amx_i8_min_m, int64_t amx_min_m, prepared_t *pr) {
    memset(pr, 0, sizeof(*pr));
#if defined(TM_I8_DIRECT)
    int64_t any = 0;
    for (int64_t e = 0; e < E && !any; e++) any = count[e] > 0 && i8_rows(count[e], i8_max_m);
    if (amx_min_m <= 0 || !i8_direct_type(qtype) || !any) return 0;
    const int64_t nb = Kdim / QK;
    pr->xq = (int8_t *)malloc((size_t)(P * Kdim + 64));
    pr->xsc = (float *)malloc((size_t)(P * nb + 1) * sizeof(float));
    pr->xs = (float *)malloc((size_t)(P * nb + 1) * sizeof(float));
    pr->xqv = (int8_t *)malloc((size_t)(P * Kdim + 64));
    pr->xsc2 = (float *)malloc((size_t)(P * Kdim / 16 + 16) * sizeof(float));
    pr->xs16 = (float *)malloc((size_t)(P * Kdim / 16 + 16) * sizeof(float));
    pr->tb = (int64_t *)malloc((size_t)E * sizeof(int64_t));
    if (!pr->xq || !pr->xsc || !pr->xs || !pr->xqv || !pr->xsc2 || !pr->xs16 || !pr->tb) return -1;
    int64_t tiles = 0;
    for (int64_t e = 0; e < E; e++) {
        pr->tb[e] = -1;
        const int64_t m = count[e];
        if (m > 0 && i8_rows(m, i8_max_m) && amx_i8_min_m > 0 && m >= amx_i8_min_m && amx_i8_ok(qtype)) {
            pr->tb[e] = tiles;
            tiles += (m + 15) / 16;
        }
    }
#if defined(TM_AMX_I8)
    if (tiles > 0) {
        pr->xb = (int8_t *)aligned_alloc(64, (size_t)(tiles * 16 * Kdim));
        pr->xscT = (float *)malloc((size_t)(tiles * 16 * nb) * sizeof(float));
        pr->xsT = (float *)malloc((size_t)(tiles * 16 * nb) * sizeof(float));
        if (!pr->xb || !pr->xscT || !pr->xsT) return -1;
    }
#endif
#pragma omp parallel for schedule(dynamic, 1) if (P * Kdim >= (1 << 16))
    for (int64_t e = 0; e < E; e++) {
        const int64_t s = start[e];
        if (count[e] == 0 || !i8_rows(count[e], i8_max_m)) continue;
        tm_prepare_x_i8(a + s * Kdim, count[e], Kdim, pr->xq + s * Kdim, pr->xsc + s * nb, pr->xs + s * nb,
                        pr->xqv + s * Kdim, pr->xsc2 + s * (Kdim / 16), pr->xs16 + s * (Kdim / 16));
#if defined(TM_AMX_I8)
        if (pr->tb[e] >= 0)
            tm_prepare_x_amx_i8(pr->xq + s * Kdim, pr->xsc + s * nb, pr->xs + s * nb, count[e], Kdim,
                                pr->xb + pr->tb[e] * 16 * Kdim, pr->xscT + pr->tb[e] * 16 * nb,
                                pr->xsT + pr->tb[e] * 16 * nb);
#endif
    }
#else
    (void)qtype; (void)a; (void)P; (void)Kdim; (void)start; (void)count; (void)E; (void)i8_max_m;
    (void)amx_i8_min_m; (void)amx_min_m; (void)amx_i8_ok;
#endif
    return 0;
}

// The experts of the AMX bf16 tiles (rows past the int8 paths', amx_min_m or more, tiles granted): their rows of a
// rounded to bf16 into scratch (x16_floats floats there, NULL: allocate). 0, -1 out of memory.
static int prepare_bf16(const float *a, int64_t P, int64_t Kdim, const int64_t *start, const int64_t *count,
                        int64_t E, int64_t i8_max_m, int64_t amx_min_m, float *scratch, int64_t x16_floats,
                        prepared_t *pr) {
#if defined(TM_AMX)
    if (amx_min_m <= 0 || !tm_amx_enabled() || Kdim % 32) return 0;
    int64_t any = 0;
    pr->amx16 = (char *)calloc((size_t)E, 1);
    if (!pr->amx16) return -1;
    for (int64_t e = 0; e < E; e++) {
        const int64_t m = count[e];
        pr->amx16[e] = m > 0 && m >= amx_min_m && !(pr->xq != NULL && i8_rows(m, i8_max_m));
        any |= pr->amx16[e];
    }
    if (!any) return 0;
    const int64_t need = ((P + 16) * Kdim + 1) / 2;  // floats
    pr->x16_owned = scratch == NULL || x16_floats < need;
    pr->x16 = pr->x16_owned ? (uint16_t *)malloc((size_t)need * sizeof(float)) : (uint16_t *)scratch;
    if (!pr->x16) return -1;
    memset(pr->x16 + P * Kdim, 0, (size_t)(16 * Kdim) * 2);
#pragma omp parallel for schedule(dynamic, 1) if (P * Kdim >= (1 << 16))
    for (int64_t e = 0; e < E; e++)
        if (pr->amx16[e]) tm_x_to_bf16(a + start[e] * Kdim, count[e], Kdim, pr->x16 + start[e] * Kdim, Kdim);
#else
    (void)a; (void)P; (void)scratch; (void)x16_floats;
    if (amx_min_m <= 0 || !tm_qlinear_bf16_available() || Kdim % QK) return 0;
    pr->dot16 = (char *)calloc((size_t)E, 1);
    if (!pr->dot16) return -1;
    for (int64_t e = 0; e < E; e++) {
        const int64_t m = count[e];
        pr->dot16[e] = m > 0 && m >= amx_min_m && !(pr->xq != NULL && i8_rows(m, i8_max_m));
    }
    (void)start;
#endif
    return 0;
}

static void release(prepared_t *pr) {
    free(pr->xq); free(pr->xb); free(pr->xsc); free(pr->xs); free(pr->xscT); free(pr->xsT); free(pr->xqv); free(pr->xsc2); free(pr->xs16);
    free(pr->tb); free(pr->amx16); free(pr->dot16);
    if (pr->x16_owned) free(pr->x16);
    memset(pr, 0, sizeof(*pr));
}

// y[start_e + m, n0 + c] = a[start_e + m, :] @ W_e[n0 + c, :]^T for every task; W_e = w + e * N * row_bytes
static int grouped_gemm(int qtype, const float *a, const prepared_t *pr, int64_t Kdim, const uint8_t *w, int64_t N,
                        int64_t row_bytes, const int64_t *start, const int64_t *count, const task_t *tasks,
                        int64_t ntasks, int64_t max_rows, int64_t direct_max_m, int64_t i8_max_m, int64_t amx_min_m,
                        float *y) {
    int err = 0;
    int64_t dot_rows = 0;  // the widest task of an expert on the AVX512-BF16 panels: its panels' buffer
    for (int64_t i = 0; pr->dot16 != NULL && i < ntasks; i++)
        if (pr->dot16[tasks[i].e] && tasks[i].nc > dot_rows) dot_rows = tasks[i].nc;
#pragma omp parallel
    {
        float *tmp = (float *)malloc((size_t)(max_rows * TILE_N_AMX + 1) * sizeof(float));
        uint32_t *panels = dot_rows ? (uint32_t *)aligned_alloc(64, (size_t)((dot_rows + 31) / 32 * 32 * Kdim * 2))
                                    : NULL;
        if (!tmp || (dot_rows && !panels)) {
#pragma omp atomic write
            err = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntasks; i++) {
            if (!tmp || (dot_rows && !panels)) continue;
            const task_t t = tasks[i];
            const int64_t m = count[t.e], s = start[t.e];
            const uint8_t *wt = w + (t.e * N + t.n0) * row_bytes;
            float *yt = y + s * N + t.n0;  // the task's block of y (row stride N): the tiles' paths write it directly
            if (pr->dot16 != NULL && pr->dot16[t.e]) {
                if (tm_qlinear_bf16_pack(qtype, wt, Kdim, t.nc, panels) != 0 ||
                    tm_qlinear_bf16_panels(panels, a + s * Kdim, m, Kdim, t.nc, NULL, yt, N, 0, NULL) != 0) {
#pragma omp atomic write
                    err = -1;
                }
                continue;
            }
#if defined(TM_AMX)
            if (pr->x16 != NULL && pr->amx16[t.e]) {
                if (tm_qlinear_amx_bf16x(qtype, pr->x16 + s * Kdim, Kdim, m, Kdim, wt, t.nc, yt, N) != 0) {
#pragma omp atomic write
                    err = -1;
                }
                continue;
            }
#endif
#if defined(TM_I8_DIRECT)
#if defined(TM_AMX_I8)
            if (pr->xq != NULL && i8_rows(m, i8_max_m) && pr->tb[t.e] >= 0) {
                const int64_t nb = Kdim / QK, tb = pr->tb[t.e];
                if (tm_qlinear_amx_i8(qtype, pr->xb + tb * 16 * Kdim, pr->xscT + tb * 16 * nb, pr->xsT + tb * 16 * nb, m,
                                      Kdim, wt, t.nc, yt, N) != 0) {
#pragma omp atomic write
                    err = -1;
                }
                continue;
            }
#endif
            if (pr->xq != NULL && i8_rows(m, i8_max_m)) {
                const int64_t nb = Kdim / QK;
                tm_qlinear_i8_prepared(qtype, pr->xqv + s * Kdim, pr->xsc2 + s * (Kdim / 16), pr->xs + s * nb,
                                       pr->xs16 + s * (Kdim / 16), m, Kdim, wt, t.nc, NULL, yt, N);
                continue;
            }
#endif
            if (qlinear_f32(qtype, a + s * Kdim, m, Kdim, wt, t.nc, NULL, tmp, direct_max_m, amx_min_m) != 0) {
#pragma omp atomic write
                err = -7;
                continue;
            }
            for (int64_t r = 0; r < m; r++) memcpy(yt + r * N, tmp + r * t.nc, (size_t)t.nc * sizeof(float));
        }
        free(tmp);
        free(panels);
    }
    return err;
}

// x [T, H] float32, topk_ids [T, K] int64 in [0, E), topk_w [T, K] float32, w13 packed [E, 2I] rows of
// row_bytes_h in block type qtype13, w2 packed [E, H] rows of row_bytes_i in block type qtype2; out [T, H].
// amx_min_m > 0 is gemm auto: an expert's run of 1..i8_max_m rows takes int8 activations (k-quants, an AVX512-VNNI
// build): the AMX int8 tiles from amx_i8_min_m rows (where built and granted), else the VNNI tiles; a longer run of
// amx_min_m or more rows takes qlinear's AMX bf16 path (where this library's tm_amx_init enabled it), as the dense
// layers do under --gemm-dtype auto. amx_min_m 0: exact float32. ws (may be NULL): ws_floats floats of scratch the
// call uses instead of allocating its row buffers when there are at least tm_moe_ws_floats(P, H, I) of them.
// Returns 0; -1 out of memory; -2 an expert id out of range; -7 qlinear rejected its arguments (K not a multiple
// of the block, unknown type).
// The scratch of a call of P token-expert pairs: xs [P, H] (gathered rows, then the experts' outputs y), g [P, 2I]
// (gate|up), act [P, max(I, H / 2)] (the activations; during gate|up the AMX experts' bf16 rows of x), and 16
// rows of H bf16 of slack for the tiles' padding rows.
int64_t tm_moe_ws_floats(int64_t P, int64_t H, int64_t I) { return P * (H + 2 * I + (I > H / 2 ? I : H / 2)) + 8 * H; }

int tm_moe_packed(int qtype13, int qtype2, const float *x, int64_t T, int64_t H, int64_t I, int64_t E, int64_t K,
                  const int64_t *topk_ids, const float *topk_w, const uint8_t *w13, int64_t row_bytes_h,
                  const uint8_t *w2, int64_t row_bytes_i, int64_t direct_max_m, int64_t i8_max_m, int64_t amx_i8_min_m,
                  int64_t amx_min_m, float *ws, int64_t ws_floats, float *out) {
    const int64_t P = T * K;
    memset(out, 0, (size_t)(T * H) * sizeof(float));
    if (P == 0) return 0;
    for (int64_t p = 0; p < P; p++)
        if (topk_ids[p] < 0 || topk_ids[p] >= E) return -2;
    int64_t *count = (int64_t *)calloc((size_t)E, sizeof(int64_t)), *start = (int64_t *)malloc((size_t)E * sizeof(int64_t));
    int64_t *pos = (int64_t *)malloc((size_t)P * sizeof(int64_t)), *fill = (int64_t *)malloc((size_t)E * sizeof(int64_t));
    const int64_t max_tasks = E * ((2 * I + TILE_N - 1) / TILE_N + (H + TILE_N - 1) / TILE_N);
    task_t *tasks = (task_t *)malloc((size_t)(max_tasks + 1) * sizeof(task_t));
    // xs [P, H], g [P, 2I], act [P, I], y [P, H]: in the caller's workspace where it is large enough
    const int own = ws == NULL || ws_floats < tm_moe_ws_floats(P, H, I);
    float *xs = own ? (float *)malloc((size_t)(P * H) * sizeof(float)) : ws;
    float *g = own ? (float *)malloc((size_t)(P * 2 * I) * sizeof(float)) : ws + P * H;
    float *act = own ? (float *)malloc((size_t)(P * I) * sizeof(float)) : ws + P * (H + 2 * I);
    float *y = own ? (float *)malloc((size_t)(P * H) * sizeof(float)) : xs;  // xs is dead once gate|up has run
    int rc = -1;
    prepared_t pr;
    memset(&pr, 0, sizeof(pr));
    if (!count || !start || !pos || !fill || !tasks || !xs || !g || !act || !y) goto done;
    for (int64_t p = 0; p < P; p++) count[topk_ids[p]]++;
    int64_t max_rows = 0;
    for (int64_t e = 0, s = 0; e < E; e++) {
        start[e] = fill[e] = s;
        s += count[e];
        if (count[e] > max_rows) max_rows = count[e];
    }
    for (int64_t p = 0; p < P; p++) pos[p] = fill[topk_ids[p]]++;  // sorted slot of pair p (stable)
#pragma omp parallel for schedule(static) if (P * H >= (1 << 15))
    for (int64_t p = 0; p < P; p++) memcpy(xs + pos[p] * H, x + (p / K) * H, (size_t)H * sizeof(float));
    int64_t nt = make_tasks(count, E, 2 * I, i8_max_m, amx_min_m, tasks);
    rc = prepare(qtype13, xs, P, H, start, count, E, i8_max_m, amx_i8_min_m, amx_min_m, &pr);
    // gate|up's bf16 rows in act's region (free until silu) and the slack after it
    if (rc == 0)
        rc = prepare_bf16(xs, P, H, start, count, E, i8_max_m, amx_min_m, own ? NULL : act,
                          own ? 0 : ws_floats - P * (H + 2 * I), &pr);
    if (rc == 0)
        rc = grouped_gemm(qtype13, xs, &pr, H, w13, 2 * I, row_bytes_h, start, count, tasks, nt, max_rows,
                          direct_max_m, i8_max_m, amx_min_m, g);
    if (rc != 0) goto done;
#pragma omp parallel for schedule(static) if (P * I >= (1 << 15))
    for (int64_t p = 0; p < P; p++) tm_silu_mul_row(g + p * 2 * I, g + p * 2 * I + I, act + p * I, I);
    release(&pr);
    nt = make_tasks(count, E, H, i8_max_m, amx_min_m, tasks);
    rc = prepare(qtype2, act, P, I, start, count, E, i8_max_m, amx_i8_min_m, amx_min_m, &pr);
    // down's bf16 rows in g's region (free after silu; not y's = xs's, which the tiles write)
    if (rc == 0)
        rc = prepare_bf16(act, P, I, start, count, E, i8_max_m, amx_min_m, own ? NULL : g, own ? 0 : P * 2 * I, &pr);
    if (rc == 0)
        rc = grouped_gemm(qtype2, act, &pr, I, w2, H, row_bytes_i, start, count, tasks, nt, max_rows, direct_max_m,
                          i8_max_m, amx_min_m, y);
    if (rc != 0) goto done;
#pragma omp parallel for schedule(static) if (T * H >= (1 << 15))
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            const float wk = topk_w[t * K + k], *yp = y + pos[t * K + k] * H;
            for (int64_t h = 0; h < H; h++) out[t * H + h] += wk * yp[h];
        }
done:
    release(&pr);
    free(count); free(start); free(pos); free(fill); free(tasks);
    if (own) { free(xs); free(g); free(act); free(y); }
    return rc;
}
