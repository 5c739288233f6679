/* Where the fused C pass's time goes: ΔW alone (the pass's own deltas()) against a whole merge and unmerge, one
 * thread, an n x n weight (4096 unless given; fp32 unless given), rank 16, std(ΔW) about 0.05·std(W). Built with the pass's own flags:
 *
 *   cc -O3 -std=c11 -ffp-contract=off -fno-trapping-math -march=x86-64-v4 -g \
 *      benchmarks/merge_parts.c -o /tmp/merge_parts -lm && /tmp/merge_parts [0|1|2]
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

int main(int argc, char **argv) {
    const int kind = argc > 1 ? atoi(argv[1]) : 0, size = kind == 0 ? 4 : 2; /* 0 fp32, 1 bf16, 2 fp16 */
    const i64 n = argc > 2 ? atoi(argv[2]) : 4096, r = 16, block_rows = 262144 / n, blocks = n / block_rows,
              work_rows = 32768 / n; /* as _torch.BLOCK_ELEMENTS and _cpu._work */
    void *W = malloc(n * n * 4), *W0 = malloc(n * n * 4);
    float *A = malloc(r * n * 4), *B = malloc(n * r * 4);
    float *work = malloc(work_rows * n * 4);
    for (i64 i = 0; i < n * n; i++) { /* unit normal, rounded to W's dtype */
        vf g = {gauss()};
        store(W, i, kind == 0 ? b_of(g[0]) : kind == 1 ? f2bf_v(g, 1)[0] : f2h(g[0]), kind);
    }
    for (i64 i = 0; i < r * n; i++) A[i] = gauss();
    for (i64 i = 0; i < n * r; i++) B[i] = gauss();
    memcpy(W0, W, n * n * size);
    const float scale = 0.05f / sqrtf((float)r); /* std(ΔW) = 0.05 · std(W) for unit-normal factors */
    u32 **words = malloc(blocks * sizeof(u32 *));
    i64 *n_words = malloc(blocks * sizeof(i64)), *n_esc = malloc(blocks * sizeof(i64)), out[3];
    i64 **esc_index = malloc(blocks * sizeof(i64 *));
    void **esc_values = malloc(blocks * sizeof(void *));
    for (i64 b = 0; b < blocks; b++) {
        words[b] = malloc((block_rows * n + 2) * 4);
        esc_index[b] = malloc(block_rows * n * sizeof(i64));
        esc_values[b] = malloc(block_rows * n * 4);
    }
    u64 record_hash = 1469598103934665603ull; /* FNV-1a over the first round's words and escapes */
    i64 total_words = 0, total_esc = 0;
    double t_delta[ROUNDS], t_merge[ROUNDS], t_unmerge[ROUNDS], sink = 0;
    for (int k = 0; k < ROUNDS; k++) {
        double t0 = now();
        for (i64 row = 0; row < n; row += work_rows) {
            deltas(A, n, B, r, scale, row, work_rows, n, work);
            sink += work[5];
        }
        double t1 = now();
        for (i64 b = 0; b < blocks; b++) {
            i64 bad = pl_merge(kind, (char *)W + b * block_rows * n * size, block_rows, n, A, n, B + b * block_rows * r, r, scale, NULL,
                               work, work_rows, words[b], esc_index[b], esc_values[b], out);
            if (bad >= 0) { printf("unexpected overflow\n"); return 1; }
            n_words[b] = out[0], n_esc[b] = out[1];
        }
        double t2 = now();
        for (i64 b = 0; b < blocks; b++)
            pl_unmerge(kind, (char *)W + b * block_rows * n * size, block_rows, n, A, n, B + b * block_rows * r, r, scale, NULL, work,
                       work_rows, words[b], n_words[b]);
        double t3 = now();
        for (i64 b = 0; b < blocks; b++)
            for (i64 e = 0; e < n_esc[b]; e++) store((char *)W + b * block_rows * n * size, esc_index[b][e] , load(esc_values[b], e, kind), kind);
        if (k == 0)
            for (i64 b = 0; b < blocks; b++) {
                total_words += n_words[b], total_esc += n_esc[b];
                for (i64 i = 0; i < n_words[b]; i++) record_hash = (record_hash ^ words[b][i]) * 1099511628211ull;
                for (i64 e = 0; e < n_esc[b]; e++) record_hash = (record_hash ^ (u64)esc_index[b][e]) * 1099511628211ull;
            }
        if (memcmp(W, W0, n * n * size)) { printf("unmerge is not bit-exact\n"); return 1; }
        t_delta[k] = t1 - t0, t_merge[k] = t2 - t1, t_unmerge[k] = t3 - t2;
    }
    qsort(t_delta, ROUNDS, sizeof(double), by_value);
    qsort(t_merge, ROUNDS, sizeof(double), by_value);
    qsort(t_unmerge, ROUNDS, sizeof(double), by_value);
    printf("%lld² %s, r=16, one thread, medians of %d: dW alone %.1f ms, merge %.1f ms, unmerge %.1f ms "
           "(round trip bit-exact; %.3f bits/element, %lld escapes, record hash %016llx; checksum %g)\n",
           (long long)n, kind == 0 ? "fp32" : kind == 1 ? "bf16" : "fp16", ROUNDS, t_delta[ROUNDS / 2] * 1e3,
           t_merge[ROUNDS / 2] * 1e3, t_unmerge[ROUNDS / 2] * 1e3, 32.0 * total_words / (n * n), (long long)total_esc,
           (unsigned long long)record_hash, sink);
    return 0;
}
