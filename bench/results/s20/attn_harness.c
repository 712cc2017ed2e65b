/* Stand-alone timing of tm_paged_attention (csrc/attention.c) on a SmolLM2-135M decode step's shape: nreq requests
 * of ~260 tokens (H 9, Hkv 3, D 64, block 16, bf16 K/V), cycling over nl layer pools (cold when nl pools exceed the
 * caches). Prints us per call and ns per (key, KV head). See README.md for the build and run lines.
 *     ./a.out NREQ ITERS [NLAYERS] */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <string.h>
int tm_paged_attention(const float *q, int64_t q_st, int64_t q_sh, const void *kv, int kv_dtype, int64_t num_blocks,
                       int block_size, int hkv, int d, const int32_t *block_tables, int64_t bt_stride, int64_t bt_cols,
                       const int32_t *seq_lens, const int32_t *qsl, int num_reqs, int h, float scale, int window, float *out);
int main(int argc, char **argv) {
    int nreq = atoi(argv[1]), iters = atoi(argv[2]), nl = argc > 3 ? atoi(argv[3]) : 1;
    const int H = 9, HKV = 3, D = 64, BS = 16, L = 260, nbr = (L + BS - 1) / BS;
    int64_t nb = (int64_t)nreq * nbr;
    uint16_t *kvs[64];
    for (int l = 0; l < nl; l++) { uint16_t *kv = kvs[l] = malloc(2 * nb * BS * HKV * D * 2);
    for (int64_t i = 0; i < 2 * nb * BS * HKV * D; i++) { float f = (float)(i % 1000) / 1000 - 0.5f; uint32_t u; memcpy(&u, &f, 4); kv[i] = u >> 16; } }
    int32_t *bt = malloc(sizeof(int32_t) * nb), *sl = malloc(4 * nreq), *qsl = malloc(4 * (nreq + 1));
    for (int64_t i = 0; i < nb; i++) bt[i] = (int32_t)((i * 7919) % nb);
    for (int i = 0; i < nreq; i++) { sl[i] = L - (i % 7); qsl[i] = i; }
    qsl[nreq] = nreq;
    float *q = malloc(4 * nreq * H * D), *out = malloc(4 * nreq * H * D);
    for (int i = 0; i < nreq * H * D; i++) q[i] = (float)rand() / RAND_MAX - 0.5f;
    struct timespec t0, t1;
    tm_paged_attention(q, H * D, D, kvs[0], 1, nb, BS, HKV, D, bt, nbr, nbr, sl, qsl, nreq, H, 0.125f, 0, out);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int it = 0; it < iters; it++)
        tm_paged_attention(q, H * D, D, kvs[it % nl], 1, nb, BS, HKV, D, bt, nbr, nbr, sl, qsl, nreq, H, 0.125f, 0, out);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    printf("%.1f us/call, %.2f ns per (key, kv head)\n", ns / iters / 1e3, ns / iters / ((double)nreq * L * HKV));
    return 0;
}
