/* One fused pass per block for the torch backend's exact merge/unmerge on the CPU (see _cpu.py).
 *
 * It implements exactly the scheme of _bits.may_lose and _codec (docs/exact-unmerge.md), element by
 * element: the same flag, the same exact candidate runs, the same codes packed in the same order, the
 * same escapes. So its records are bit-identical to the torch-op implementation's, and either decodes
 * the other's. Built with -ffp-contract=off: every w + d is one fp32 addition, rounded once.
 *
 * kind: 0 fp32, 1 bf16, 2 fp16. Weights are passed as raw bits (uint32 or uint16 arrays).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;
typedef uint32_t u32;
typedef uint64_t u64;

static inline float f_of(u32 b) { float f; memcpy(&f, &b, 4); return f; }
static inline u32 b_of(float f) { u32 b; memcpy(&b, &f, 4); return b; }

static float h2f(u32 h) { /* fp16 bits -> fp32, exact */
    u32 s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return f_of(s | 0x7F800000u | (m << 13));
    if (e == 0) return f_of(s | b_of((float)m * 0x1p-24f)); /* zero or subnormal: m·2^-24 is exact */
    return f_of(s | ((e + 112) << 23) | (m << 13));
}

static u32 f2h(float f) { /* fp32 -> fp16 bits, round to nearest even (the FP16 library's method, as torch) */
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    u32 w = b_of(f), shl1 = w + w, sign = w & 0x80000000u, bias = shl1 & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f_of((bias >> 1) + 0x07800000u) + base;
    u32 b = b_of(base), nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
    return (sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign);
}

static inline u32 f2bf(float f) { /* fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0, as torch */
    u32 u = b_of(f), r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r;
}

static inline float value(u32 b, int kind) {
    return kind == 0 ? f_of(b) : kind == 1 ? f_of(b << 16) : h2f(b);
}

static inline u32 rounded(float x, int kind) { return kind == 0 ? b_of(x) : kind == 1 ? f2bf(x) : f2h(x); }

/* round(w + d) and round(W' - d), as _bits.merged_value / unmerged_guess */
static inline u32 merged(u32 wb, float d, int kind) { return rounded(value(wb, kind) + d, kind); }
static inline u32 guess_of(u32 mb, float d, int kind) { return rounded(value(mb, kind) - d, kind); }

static inline int nbits(int kind) { return kind == 0 ? 32 : 16; }
static inline i64 max_finite(int kind) { return kind == 0 ? 0x7F7FFFFF : kind == 1 ? 0x7F7F : 0x7BFF; }

static inline i64 ordinal(u32 b, int kind) {
    u32 sign = 1u << (nbits(kind) - 1);
    return (b & sign) ? -1 - (i64)(b & (sign - 1)) : (i64)b;
}

static inline u32 from_ordinal(i64 o, int kind) {
    u32 sign = 1u << (nbits(kind) - 1);
    return o >= 0 ? (u32)o : ((u32)(-1 - o) | sign);
}

/* The smallest ordinal o in [low, high + 1] with ordinal(round(o + d)) >= target (strict: > target);
 * o = high + 1 counts as true. Gallops from start, then bisects; the answer does not depend on start. */
static i64 first_true(i64 start, float d, i64 target, int strict, int kind, i64 low, i64 high) {
#define PRED(o) ((o) > high || (strict ? ordinal(merged(from_ordinal(o, kind), d, kind), kind) > target \
                                        : ordinal(merged(from_ordinal(o, kind), d, kind), kind) >= target))
    if (start < low) start = low;
    if (start > high) start = high;
    i64 lo, hi, step = 1;
    if (PRED(start)) {
        hi = start;
        for (;;) {
            i64 probe = hi - step;
            if (probe < low) { lo = low - 1; break; }
            if (PRED(probe)) { hi = probe; step *= 2; } else { lo = probe; break; }
        }
    } else {
        lo = start;
        for (;;) {
            i64 probe = lo + step;
            if (probe > high) { hi = high + 1; break; }
            if (PRED(probe)) { hi = probe; break; } else { lo = probe; step *= 2; }
        }
    }
    while (hi - lo > 1) {
        i64 mid = lo + (hi - lo) / 2;
        if (PRED(mid)) hi = mid; else lo = mid;
    }
    return hi;
#undef PRED
}

static i64 estimate(double bound, float d, int kind, i64 low, i64 high) {
    i64 o = ordinal(rounded((float)(bound - (double)d), kind), kind);
    return o < low ? low : o > high ? high : o;
}

/* The run [first, first + count) of originals that merge to mb under d (_codec.candidates). */
static void candidates(u32 mb, float d, int kind, i64 *first, i64 *count) {
    i64 high = max_finite(kind), low = -1 - high, target = ordinal(mb, kind);
    double m = value(mb, kind);
    double below = (m + (double)value(from_ordinal(target - 1, kind), kind)) / 2;
    double above = (m + (double)value(from_ordinal(target + 1, kind), kind)) / 2;
    *first = first_true(estimate(below, d, kind, low, high), d, target, 0, kind, low, high);
    i64 end = first_true(estimate(above, d, kind, low, high), d, target, 1, kind, low, high);
    *count = end > *first ? end - *first : 0;
}

static inline i64 f_ord(i64 o, float d, int kind) { /* ordinal(round(value(o) + d)) */
    return ordinal(merged(from_ordinal(o, kind), d, kind), kind);
}

/* fp32: a cheap sufficient condition for "not flagged", so most elements skip the three evaluations.
 * With m - d = g + err exactly (TwoSum), g and m normal, neither a power of two, ulp(g) >= ulp(m) and
 * |err| < ulp(m)/2: g + d = m - err rounds to m, and g ± ulp(g) + d lies more than ulp(m)/2 from m, so
 * neither neighbour of g merges to m. That is the exact test's "not flagged", proved, not estimated. */
static inline int plainly_exact(u32 m, u32 g, float d) {
    u32 em = (m >> 23) & 0xFFu, eg = (g >> 23) & 0xFFu;
    if (em < 26 || em > 253 || eg < em || eg > 253 || (m & 0x7FFFFFu) == 0 || (g & 0x7FFFFFu) == 0) return 0;
    float a = f_of(m), b = -d, s = a + b, bb = s - a, err = (a - (s - bb)) + (b - bb);
    return (b_of(err) & 0x7FFFFFFFu) < ((em - 24) << 23); /* |err| < 2^(em - 127 - 24) = ulp(m)/2 */
}

/* The flag (_bits.may_lose) and, where it is set, the run (_codec.candidates), for merged value mb.
 * Most runs hold the guess g: the evaluations at g's neighbours then settle both ends, and a search
 * runs only for long runs. Returns the flag; first/count are set where it is 1. */
static int classify(u32 mb, u32 g, float d, int kind, i64 *first, i64 *count) {
    i64 high = max_finite(kind), low = -1 - high, target = ordinal(mb, kind), o = ordinal(g, kind);
    int inner = o - 1 >= low && o + 1 <= high && (g << (33 - nbits(kind))) != 0; /* finite, nonzero */
    i64 fm = 0, f0 = 0, fp = 0;
    int flag;
    if (kind == 0) {
        if (plainly_exact(mb, g, d)) return 0;
        if (inner) { /* nextafter(g, ±inf) is ordinal o ± 1 away from zero */
            fm = f_ord(o - 1, d, kind); f0 = f_ord(o, d, kind); fp = f_ord(o + 1, d, kind);
            flag = f0 != target || fm == target || fp == target;
        } else {
            float gv = f_of(g);
            flag = merged(g, d, 0) != mb || merged(b_of(nextafterf(gv, INFINITY)), d, 0) == mb ||
                   merged(b_of(nextafterf(gv, -INFINITY)), d, 0) == mb;
        }
    } else {
        u32 mm = kind == 1 ? 0x7Fu : 0x3FFu;
        u32 mag_g = g & 0x7FFFu, mag_m = mb & 0x7FFFu, mant = mag_g & mm;
        flag = mag_m > (mag_g | mm) || mant == 0 || mant == mm;
        if (flag && inner) { fm = f_ord(o - 1, d, kind); f0 = f_ord(o, d, kind); fp = f_ord(o + 1, d, kind); }
    }
    if (!flag) return 0;
    if (!inner || f0 != target) { candidates(mb, d, kind, first, count); return 1; }
    *first = fm < target ? o : first_true(o - 1, d, target, 0, kind, low, high);
    i64 end = fp > target ? o + 1 : first_true(o + 1, d, target, 1, kind, low, high);
    *count = end - *first;
    return 1;
}

static inline int width_of(i64 count) { /* ceil(log2 count), 0 for count <= 1 */
    int w = 0;
    while (count > 1 && ((i64)1 << w) < count) w++;
    return w;
}

static inline u32 load(const void *w, i64 i, int kind) {
    return kind == 0 ? ((const u32 *)w)[i] : ((const uint16_t *)w)[i];
}

static inline void store(void *w, i64 i, u32 b, int kind) {
    if (kind == 0) ((u32 *)w)[i] = b; else ((uint16_t *)w)[i] = (uint16_t)b;
}

static inline int finite(u32 b, int kind) {
    return kind == 0 ? (b & 0x7F800000u) != 0x7F800000u
         : kind == 1 ? (b & 0x7F80u) != 0x7F80u : (b & 0x7C00u) != 0x7C00u;
}

#define CHUNK 64
#define INLINE static inline __attribute__((always_inline))

/* A cheap superset of the elements that need more than "W' written, guess right, not flagged": the
 * 16-bit flag itself, or for fp32 the failure of plainly_exact. Branch-free, for the first pass. */
INLINE int maybe_flagged(u32 m, u32 g, float d, int kind) {
    if (kind == 0) {
        u32 em = (m >> 23) & 0xFFu, eg = (g >> 23) & 0xFFu;
        float a = f_of(m), b = -d, s = a + b, bb = s - a, err = (a - (s - bb)) + (b - bb);
        int ok = (em >= 26) & (em <= 253) & (eg >= em) & (eg <= 253) & ((m & 0x7FFFFFu) != 0) &
                 ((g & 0x7FFFFFu) != 0) & ((b_of(err) & 0x7FFFFFFFu) < ((em - 24) << 23));
        return !ok;
    }
    u32 mm = kind == 1 ? 0x7Fu : 0x3FFu;
    u32 mag_g = g & 0x7FFFu, mag_m = m & 0x7FFFu, mant = mag_g & mm;
    return (mag_m > (mag_g | mm)) | (mant == 0) | (mant == mm);
}

typedef struct { u64 off; i64 n_esc, n_flag, zeroed; } State;

/* Unmerge one element whose guess g may be wrong: decode it if flagged. */
INLINE u32 unmerge_one(u32 m, u32 g, float d, int kind, const u32 *words, i64 n_words, u64 *off) {
    i64 first, count;
    if (!classify(m, g, d, kind, &first, &count)) return g;
    int width = width_of(count);
    u64 code = 0;
    if (width) {
        i64 word = (i64)(*off >> 5);
        int shift = (int)(*off & 31);
        u64 both = (word < n_words ? words[word] : 0) | ((u64)(word + 1 < n_words ? words[word + 1] : 0) << 32);
        code = (both >> shift) & ((((u64)1) << width) - 1);
        *off += (u64)width;
    }
    return from_ordinal(first + (i64)code, kind);
}

INLINE void unmerge_impl(const int kind, void *w, const float *d, i64 n, const u32 *words, i64 n_words) {
    u64 off = 0;
    for (i64 c = 0; c < n; c += CHUNK) {
        i64 len = n - c < CHUNK ? n - c : CHUNK;
        u32 gv[CHUNK];
        unsigned char maybe[CHUNK];
        for (i64 j = 0; j < len; j++) { /* first pass: the guess everywhere, branch-free */
            u32 m = load(w, c + j, kind);
            gv[j] = guess_of(m, d[c + j], kind);
            maybe[j] = (unsigned char)maybe_flagged(m, gv[j], d[c + j], kind);
        }
        for (i64 j = 0; j < len; j++) {
            if (maybe[j]) gv[j] = unmerge_one(load(w, c + j, kind), gv[j], d[c + j], kind, words, n_words, &off);
        }
        for (i64 j = 0; j < len; j++) store(w, c + j, gv[j], kind);
    }
}

/* Unmerge elements [0, n) of a block in place from its code words (escapes are the caller's). */
void pl_unmerge(int kind, void *w, const float *d, i64 n, const u32 *words, i64 n_words) {
    switch (kind) {
    case 0: unmerge_impl(0, w, d, n, words, n_words); break;
    case 1: unmerge_impl(1, w, d, n, words, n_words); break;
    default: unmerge_impl(2, w, d, n, words, n_words); break;
    }
}

/* Codes and escapes for one merged element (original wb, merged m, guess g), in element order. */
INLINE void encode_one(i64 i, u32 wb, u32 m, u32 g, float d, int kind, u32 *words, i64 *esc_index,
                       void *esc_bits, State *st) {
    int escape;
    i64 first, count;
    if (classify(m, g, d, kind, &first, &count)) {
        i64 index = ordinal(wb, kind) - first;
        escape = index < 0 || index >= count;
        int width = width_of(count);
        if (width) {
            u64 v = escape ? 0 : (u64)index;
            i64 word = (i64)(st->off >> 5);
            int shift = (int)(st->off & 31);
            while (st->zeroed <= word + 1) words[st->zeroed++] = 0;
            words[word] |= (u32)(v << shift);
            if (width > 32 - shift) words[word + 1] |= (u32)(v >> (32 - shift));
            st->off += (u64)width;
        }
        st->n_flag++;
    } else {
        escape = g != wb;
    }
    if (escape) {
        esc_index[st->n_esc] = i;
        store(esc_bits, st->n_esc, wb, kind);
        st->n_esc++;
    }
}

INLINE i64 merge_impl(const int kind, void *w, const float *d, i64 n, u32 *words, i64 *esc_index,
                      void *esc_bits, i64 *out) {
    State st = {0, 0, 0, 0};
    for (i64 c = 0; c < n; c += CHUNK) {
        i64 len = n - c < CHUNK ? n - c : CHUNK;
        u32 wv[CHUNK], mv[CHUNK], gv[CHUNK];
        unsigned char maybe[CHUNK];
        int bad = 0;
        for (i64 j = 0; j < len; j++) { /* first pass: merged values and the cheap test, branch-free */
            u32 wb = load(w, c + j, kind), m = merged(wb, d[c + j], kind);
            wv[j] = wb;
            mv[j] = m;
            gv[j] = guess_of(m, d[c + j], kind);
            bad |= (!finite(m, kind)) & finite(wb, kind);
            maybe[j] = (unsigned char)(maybe_flagged(m, gv[j], d[c + j], kind) | (gv[j] != wb));
        }
        if (bad) { /* some element would overflow: restore what this block merged so far, report it */
            i64 j = 0;
            while (finite(mv[j], kind) || !finite(wv[j], kind)) j++;
            for (i64 k = 0; k < j; k++) { /* the chunk's elements before it, as if merged */
                store(w, c + k, mv[k], kind);
                if (maybe[k]) encode_one(c + k, wv[k], mv[k], gv[k], d[c + k], kind, words, esc_index, esc_bits, &st);
            }
            unmerge_impl(kind, w, d, c + j, words, (i64)((st.off + 31) >> 5));
            for (i64 k = 0; k < st.n_esc; k++) store(w, esc_index[k], load(esc_bits, k, kind), kind);
            return c + j;
        }
        for (i64 j = 0; j < len; j++) store(w, c + j, mv[j], kind);
        for (i64 j = 0; j < len; j++) {
            if (maybe[j]) encode_one(c + j, wv[j], mv[j], gv[j], d[c + j], kind, words, esc_index, esc_bits, &st);
        }
    }
    out[0] = (i64)((st.off + 31) >> 5);
    out[1] = st.n_esc;
    out[2] = st.n_flag;
    return -1;
}

/* Merge a block in place: W' = round(w + d), codes into words (n + 2 words at least), escapes into
 * esc_index / esc_bits (n entries at least). Returns -1, or the index of the first element whose merged
 * value would be non-finite (W finite): then the block is restored bit-exactly before returning.
 * out[0] = words used, out[1] = escapes, out[2] = flagged elements. */
i64 pl_merge(int kind, void *w, const float *d, i64 n, u32 *words, i64 *esc_index, void *esc_bits, i64 *out) {
    switch (kind) {
    case 0: return merge_impl(0, w, d, n, words, esc_index, esc_bits, out);
    case 1: return merge_impl(1, w, d, n, words, esc_index, esc_bits, out);
    default: return merge_impl(2, w, d, n, words, esc_index, esc_bits, out);
    }
}
