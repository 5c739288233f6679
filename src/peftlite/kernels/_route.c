/* Per-sample LoRA routing for the inference forward of a Linear layer on the CPU (see routing.py).
 *
 * Each routed row n of the batch, every token t of it, goes through its own adapter k = slot of n:
 *     y[n, t] += scale_k · B_k (A_k x[n, t])        A_k: (r_k, in), B_k: (out, r_k), row-major fp32
 * The rows arrive sorted by adapter, so each adapter's factors serve a whole run of rows from cache, and
 * the next run's factors are prefetched while this one starts. Per run, B_k is first transposed into
 * scratch (r_k, ld): the second product is then, per tile of TILE outputs, r_k multiply-adds of contiguous
 * vectors, with no reduction across lanes (a dot product of length r_k per output measured ~15x slower; the
 * transpose costs about what three rows' products do, for r = 16 and 1024 features). The first product is
 * r_k dot products of length in, four at a time so that they share the loads of x.
 *
 * Built with -fopenmp-simd (the dot products' reductions) and -ffp-contract=fast (fused multiply-adds):
 * the sums are not in torch's order, but each row's result depends on its own data only, so it is the
 * same run to run and however the rows are split among threads.
 */
#include <stdint.h>
#include <stdlib.h>

typedef int64_t i64;
#define INLINE static inline __attribute__((always_inline))
#define TILE 64 /* outputs per tile of the second product: 4 AVX-512 (8 AVX2) registers of accumulators */

/* h[j] = scale · (x · A[j]) for j < r.  x: (in,), A: (r, in), h: (r,). */
static void project(const float *restrict x, const float *restrict A, i64 in, i64 r, float scale,
                    float *restrict h) {
    i64 j = 0;
    for (; j + 4 <= r; j += 4) {
        const float *a0 = A + j * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (i64 i = 0; i < in; i++) {
            float xi = x[i];
            s0 += xi * a0[i];
            s1 += xi * a1[i];
            s2 += xi * a2[i];
            s3 += xi * a3[i];
        }
        h[j] = scale * s0;
        h[j + 1] = scale * s1;
        h[j + 2] = scale * s2;
        h[j + 3] = scale * s3;
    }
    for (; j < r; j++) {
        const float *a = A + j * in;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (i64 i = 0; i < in; i++) s += x[i] * a[i];
        h[j] = scale * s;
    }
}

/* y[o] += Σ_j h[j] BT[j, o] for o < len <= TILE.  BT: rows of stride ld, from the tile's first output. */
INLINE void expand_tile(const float *restrict BT, i64 ld, i64 r, const float *restrict h, float *restrict y,
                        i64 len) {
    float acc[TILE] = {0};
    for (i64 j = 0; j < r; j++) {
        const float *restrict b = BT + j * ld;
        float hj = h[j];
        for (i64 o = 0; o < len; o++) acc[o] += hj * b[o];
    }
    for (i64 o = 0; o < len; o++) y[o] += acc[o];
}

/* y += BTᵀ h.  BT: (r, ld), the transposed B (out <= ld); h: (r,); y: (out,). */
static void expand(const float *restrict BT, i64 ld, i64 out, i64 r, const float *restrict h, float *restrict y) {
    i64 o0 = 0;
    for (; o0 + TILE <= out; o0 += TILE) expand_tile(BT + o0, ld, r, h, y + o0, TILE); /* constant trip count */
    if (o0 < out) expand_tile(BT + o0, ld, r, h, y + o0, out - o0);
}

/* Prefetch bytes [from, to) at p into cache, 64-byte line by line. Each adapter's factors, and each
 * token's row of x and of y, lie in pages of their own, which the hardware prefetchers do not run into. */
INLINE void prefetch(const void *p, i64 from, i64 to) {
    for (i64 at = from; at < to; at += 64) __builtin_prefetch((const char *)p + at);
}

/* The factors the next run of rows reads, prefetched part by part while this run transposes its B. */
typedef struct { const float *a, *b; i64 a_bytes, b_bytes; } Next;

INLINE void prefetch_part(const Next *next, i64 i, i64 parts) { /* part i of parts */
    prefetch(next->a, next->a_bytes * i / parts, next->a_bytes * (i + 1) / parts);
    prefetch(next->b, next->b_bytes * i / parts, next->b_bytes * (i + 1) / parts);
}

/* BT[j, o] = B[o, j].  B: (out, r) -> BT: (r, ld); 16 of B's rows at a time, read while they sit in L1. */
static void transpose(const float *restrict B, i64 out, i64 r, float *restrict BT, i64 ld, const Next *next) {
    i64 o0 = 0, tiles = out / 16;
    for (; o0 + 16 <= out; o0 += 16) {
        prefetch_part(next, o0 / 16, tiles);
        for (i64 j = 0; j < r; j++)
            for (i64 o = 0; o < 16; o++) BT[j * ld + o0 + o] = B[(o0 + o) * r + j];
    }
    for (; o0 < out; o0++)
        for (i64 j = 0; j < r; j++) BT[j * ld + o0] = B[o0 * r + j];
}

/* The row stride of the transposed B: out rounded up to 16 floats, and not a multiple of 1 KiB, whose rows
 * would all fall into the same few L1 sets. */
static i64 stride_for(i64 out) {
    i64 ld = (out + 15) / 16 * 16;
    return ld % 256 == 0 ? ld + 16 : ld;
}

/* Route rows[0..n) of the batch: row rows[p] (each of its tokens) through adapter slot[p], -1 for none,
 * where equal slots are adjacent (rows sorted by adapter). x: (N, tokens, in) and y: (N, tokens, out),
 * contiguous fp32, y updated in place. Adapter k: A at a_ptr[k] (ranks[k], in), B at b_ptr[k]
 * (out, ranks[k]), contiguous fp32, and scales[k]. Returns 0, or -1 (y untouched) when the scratch memory
 * cannot be allocated. */
i64 pl_route(i64 in, i64 out, i64 tokens, const float *x, float *y, const i64 *rows, const i64 *slot, i64 n,
             const i64 *a_ptr, const i64 *b_ptr, const i64 *ranks, const float *scales) {
    i64 r_max = 0, ld = stride_for(out);
    for (i64 p = 0; p < n; p++) r_max = slot[p] >= 0 && ranks[slot[p]] > r_max ? ranks[slot[p]] : r_max;
    if (r_max == 0) return 0;
    size_t bytes = (size_t)(r_max * ld + r_max) * sizeof(float);
    float *BT = aligned_alloc(64, (bytes + 63) / 64 * 64); /* rows of BT on cache-line boundaries */
    if (BT == NULL) return -1;
    float *h = BT + r_max * ld;
    for (i64 p = 0, end; p < n; p = end) {
        i64 k = slot[p];
        for (end = p + 1; end < n && slot[end] == k;) end++;
        if (k < 0) continue; /* rows without an adapter */
        const float *A = (const float *)(intptr_t)a_ptr[k];
        Next next = {A, A, 0, 0}; /* nothing to prefetch after the last run */
        if (end < n) {
            i64 k2 = slot[end];
            next = (Next){(const float *)(intptr_t)a_ptr[k2], (const float *)(intptr_t)b_ptr[k2],
                          ranks[k2] * in * 4, out * ranks[k2] * 4};
        }
        transpose((const float *)(intptr_t)b_ptr[k], out, ranks[k], BT, ld, &next);
        for (i64 q = p; q < end; q++) {
            for (i64 i = rows[q] * tokens; i < (rows[q] + 1) * tokens; i++) {
                if (i + 1 < (rows[q] + 1) * tokens) { /* the row's next token */
                    prefetch(x + (i + 1) * in, 0, in * 4);
                    prefetch(y + (i + 1) * out, 0, out * 4);
                }
                project(x + i * in, A, in, ranks[k], scales[k], h);
                expand(BT, ld, out, ranks[k], h, y + i * out);
            }
        }
    }
    free(BT);
    return 0;
}
