/* Seeded dropout on the CPU (see dropout.py, whose docstring defines the mask; keep_mask is the oracle).
 *
 * Element j of a run of n contiguous elements has flat index i with low 32 bits lo + j (a run never
 * crosses a multiple of 2^32; the host passes the keys k1, k2 of that 2^32 segment). It is kept iff
 *     hash = fmix32(fmix32((lo + j) ^ k1) ^ k2) >= threshold
 * and becomes fp32(x · scale) rounded once to x's dtype (fp64: x · scale in fp64), else +0. No state and
 * no order: each element depends on its own index only, so any split of the work gives the same bits.
 *
 * Built with _cpu.FLAGS (-ffp-contract=off: f2h's float steps stay separate roundings). Every loop is
 * branch-free and vectorises; each kind has an in-place loop (y == x) and a restrict one.
 *
 * kind: 0 fp32, 1 bf16, 2 fp16 (raw 16-bit patterns), 3 fp64.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;
typedef uint16_t u16;
typedef uint32_t u32;
#define INLINE static inline __attribute__((always_inline))

INLINE u32 fmix32(u32 h) { /* MurmurHash3's 32-bit finalizer */
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

INLINE int kept(u32 lo, u32 k1, u32 k2, u32 threshold) { return fmix32(fmix32(lo ^ k1) ^ k2) >= threshold; }

#include "_floats.h" /* f_of, b_of, h2f, f2h: _cpu.c's */

/* bf16 NaN keeps its sign and top payload bits, as the Triton kernels' _round does, so that the C and Triton
 * kernels agree on every bit (_cpu.c's f2bf gives torch's 0x7FC0). */
INLINE u32 f2bf(float f) {
    u32 u = b_of(f), r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return ((u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : r) & 0xFFFFu;
}

/* One loop per kind and aliasing: y[j] = keep(j) ? STORE(LOAD(x[j]) * scale) : 0. */
#define DROP(X, Y, LOAD, STORE, ZERO)                                              \
    for (i64 j = 0; j < n; j++) {                                                  \
        int keep = kept(lo + (u32)j, k1, k2, threshold);                           \
        Y[j] = keep ? STORE(LOAD(X[j]) * scale) : ZERO;                            \
    }
#define LOOPS(T, LOAD, STORE, ZERO)                                                \
    if ((const void *)x == (void *)y) {                                            \
        T *t = (T *)y;                                                             \
        DROP(t, t, LOAD, STORE, ZERO)                                              \
    } else {                                                                       \
        const T *restrict a = (const T *)x;                                        \
        T *restrict b = (T *)y;                                                    \
        DROP(a, b, LOAD, STORE, ZERO)                                              \
    }
#define SAME(v) (v)
#define BF16_IN(b) f_of((u32)(b) << 16)
#define BF16_OUT(f) (u16) f2bf(f)
#define FP16_IN(b) h2f(b)
#define FP16_OUT(f) (u16) f2h(f)

static void drop_f32(const void *x, void *y, i64 n, u32 lo, u32 k1, u32 k2, u32 threshold, float scale) {
    LOOPS(float, SAME, SAME, 0.0f)
}
static void drop_bf16(const void *x, void *y, i64 n, u32 lo, u32 k1, u32 k2, u32 threshold, float scale) {
    LOOPS(u16, BF16_IN, BF16_OUT, 0)
}
static void drop_f16(const void *x, void *y, i64 n, u32 lo, u32 k1, u32 k2, u32 threshold, float scale) {
    LOOPS(u16, FP16_IN, FP16_OUT, 0)
}
static void drop_f64(const void *x, void *y, i64 n, u32 lo, u32 k1, u32 k2, u32 threshold, double scale) {
    LOOPS(double, SAME, SAME, 0.0)
}

/* y[j] = dropout of x[j] for j < n, the first element's index having low 32 bits lo (lo + n <= 2^32).
 * x and y: contiguous arrays of the kind, either the same array (in place) or not overlapping at all. */
void pl_dropout(int kind, const void *x, void *y, i64 n, u32 lo, u32 k1, u32 k2, u32 threshold, float scale32,
                double scale64) {
    switch (kind) {
    case 0: drop_f32(x, y, n, lo, k1, k2, threshold, scale32); break;
    case 1: drop_bf16(x, y, n, lo, k1, k2, threshold, scale32); break;
    case 2: drop_f16(x, y, n, lo, k1, k2, threshold, scale32); break;
    default: drop_f64(x, y, n, lo, k1, k2, threshold, scale64); break;
    }
}
