/* Where the fused C pass's time goes: ΔW alone (the pass's own deltas()) against a whole merge and unmerge, one
 * thread, a 4096 x 4096 fp32 weight, rank 16, std(ΔW) about 0.05·std(W). Built with the pass's own flags:
 *
 *   cc -O3 -std=c11 -ffp-contract=off -fno-trapping-math -march=x86-64-v4 -g \
 *      benchmarks/merge_parts.c -o /tmp/merge_parts -lm && /tmp/merge_parts
 *
 * (-march=x86-64-v3 for AVX2). For a line-level profile: perf record /tmp/merge_parts, then
 * perf annotate --stdio -l -s merge_00 (and unmerge_00). Prints medians of 7 rounds; checks the round trip.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../src/peftlite/kernels/_cpu.c"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float gauss(void) { /* Box-Muller, from rand(): reproducible, no dependency */
    float u = (rand() + 1.0f) / (RAND_MAX + 2.0f), v = (rand() + 1.0f) / (RAND_MAX + 2.0f);
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define ROUNDS 7

int main(void) {
    const i64 n = 4096, r = 16, block_rows = 64, blocks = n / block_rows, work_rows = 8;
    float *W = malloc(n * n * 4), *W0 = malloc(n * n * 4), *A = malloc(r * n * 4), *B = malloc(n * r * 4);
    float *work = malloc(work_rows * n * 4);
    for (i64 i = 0; i < n * n; i++) W[i] = gauss();
    for (i64 i = 0; i < r * n; i++) A[i] = gauss();
    for (i64 i = 0; i < n * r; i++) B[i] = gauss();
    memcpy(W0, W, n * n * 4);
    const float scale = 0.05f / sqrtf((float)r); /* std(ΔW) = 0.05 · std(W) for unit-normal factors */
    u32 **words = malloc(blocks * sizeof(u32 *));
    i64 *n_words = malloc(blocks * sizeof(i64)), *esc_index = malloc(block_rows * n * sizeof(i64)), out[3];
    float *esc_values = malloc(block_rows * n * 4);
    for (i64 b = 0; b < blocks; b++) words[b] = malloc((block_rows * n + 2) * 4);
    double t_delta[ROUNDS], t_merge[ROUNDS], t_unmerge[ROUNDS], sink = 0;
    for (int k = 0; k < ROUNDS; k++) {
        double t0 = now();
        for (i64 row = 0; row < n; row += work_rows) {
            deltas(A, n, B, r, scale, row, work_rows, n, work);
            sink += work[5];
        }
        double t1 = now();
        for (i64 b = 0; b < blocks; b++) {
            i64 bad = pl_merge(0, W + b * block_rows * n, block_rows, n, A, n, B + b * block_rows * r, r, scale, NULL,
                               work, work_rows, words[b], esc_index, esc_values, out);
            if (bad >= 0 || out[1] != 0) { printf("unexpected overflow or escapes\n"); return 1; }
            n_words[b] = out[0];
        }
        double t2 = now();
        for (i64 b = 0; b < blocks; b++)
            pl_unmerge(0, W + b * block_rows * n, block_rows, n, A, n, B + b * block_rows * r, r, scale, NULL, work,
                       work_rows, words[b], n_words[b]);
        double t3 = now();
        if (memcmp(W, W0, n * n * 4)) { printf("unmerge is not bit-exact\n"); return 1; }
        t_delta[k] = t1 - t0, t_merge[k] = t2 - t1, t_unmerge[k] = t3 - t2;
    }
    qsort(t_delta, ROUNDS, sizeof(double), by_value);
    qsort(t_merge, ROUNDS, sizeof(double), by_value);
    qsort(t_unmerge, ROUNDS, sizeof(double), by_value);
    printf("4096² fp32, r=16, one thread, medians of %d: dW alone %.1f ms, merge %.1f ms, unmerge %.1f ms "
           "(round trip bit-exact; checksum %g)\n", ROUNDS, t_delta[ROUNDS / 2] * 1e3, t_merge[ROUNDS / 2] * 1e3,
           t_unmerge[ROUNDS / 2] * 1e3, sink);
    return 0;
}
