/* One fused pass per block for the torch backend's exact merge/unmerge on the CPU (see _cpu.py).
 *
 * It implements exactly the scheme of _torch.delta, _bits.may_lose and _codec (docs/exact-unmerge.md),
 * element by element: the same ΔW, the same flag, the same exact candidate runs, the same codes packed in
 * the same order, the same escapes. So its records are bit-identical to the torch-op implementation's,
 * and either decodes the other's. Built with -ffp-contract=off: every product and sum is one fp32
 * operation, rounded once, in vectorised code as in scalar code.
 *
 * With per-row gains (DoRA, _gain.py; gains != NULL) the merged value is round(fp32(fp32(w + d)·g)), the
 * guess round(fp32(W'/g) - d), the flag the exact one (_gain.exact_flag) for every kind, the runs are
 * searched with the sign of g folded into W', and rows with g == 0 get no codes (the caller keeps them).
 * "gained" is a compile-time constant in each instantiation, so plain merges run the same code as before.
 *
 * kind: 0 fp32, 1 bf16, 2 fp16. Weights are passed as raw bits (uint32 or uint16 arrays).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;
typedef uint32_t u32;
typedef uint64_t u64;
#define INLINE static inline __attribute__((always_inline))

#include "_floats.h"

static inline u32 f2bf(float f) { /* fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0, as torch */
    u32 u = b_of(f), r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r;
}

static inline float value(u32 b, int kind) {
    return kind == 0 ? f_of(b) : kind == 1 ? f_of(b << 16) : h2f(b);
}

static inline u32 rounded(float x, int kind) { return kind == 0 ? b_of(x) : kind == 1 ? f2bf(x) : f2h(x); }

/* round(w + d) and round(W' - d), as _bits.merged_value / unmerged_guess; with a gain (gained),
 * round(fp32(fp32(w + d)·g)) and round(fp32(fp32(W'/g) - d)) */
static inline u32 merged(u32 wb, float d, float g, int gained, int kind) {
    float t = value(wb, kind) + d;
    return rounded(gained ? t * g : t, kind);
}
static inline u32 guess_of(u32 mb, float d, float g, int gained, int kind) {
    float v = value(mb, kind);
    return rounded((gained ? v / g : v) - d, kind);
}

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

/* The smallest ordinal o in [low, high + 1] with ordinal(f(o)) >= target (strict: > target), f the merged
 * value (g > 0 with a gain); o = high + 1 counts as true. Gallops from start, then bisects; the answer does
 * not depend on start. */
INLINE i64 first_true(i64 start, float d, float g, int gained, i64 target, int strict, int kind, i64 low,
                      i64 high) {
#define F(o) ordinal(merged(from_ordinal(o, kind), d, g, gained, kind), kind)
#define PRED(o) ((o) > high || (strict ? F(o) > target : F(o) >= target))
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
#undef F
}

INLINE i64 estimate(double bound, float d, float g, int gained, int kind, i64 low, i64 high) {
    i64 o = ordinal(rounded((float)((gained ? bound / (double)g : bound) - (double)d), kind), kind);
    return o < low ? low : o > high ? high : o;
}

/* The run [first, first + count) of originals that merge to mb under d (and g) (_codec.candidates). A
 * negative gain is folded into mb's sign (round(-x) = -round(x)), so the search is over an increasing map. */
INLINE void candidates_impl(u32 mb, float d, float g, int gained, int kind, i64 *first, i64 *count) {
    if (gained && g < 0) {
        mb ^= 1u << (nbits(kind) - 1);
        g = -g;
    }
    i64 high = max_finite(kind), low = -1 - high, target = ordinal(mb, kind);
    double m = value(mb, kind);
    double below = (m + (double)value(from_ordinal(target - 1, kind), kind)) / 2;
    double above = (m + (double)value(from_ordinal(target + 1, kind), kind)) / 2;
    *first = first_true(estimate(below, d, g, gained, kind, low, high), d, g, gained, target, 0, kind, low, high);
    i64 end = first_true(estimate(above, d, g, gained, kind, low, high), d, g, gained, target, 1, kind, low, high);
    *count = end > *first ? end - *first : 0;
}

/* candidates_impl compiled once per kind and gain use (a slow path: out of line, but specialised) */
#define CANDIDATES(k, gd) __attribute__((noinline)) static void candidates_##k##gd(u32 mb, float d, float g, \
    i64 *first, i64 *count) { candidates_impl(mb, d, g, gd, k, first, count); }
CANDIDATES(0, 0) CANDIDATES(1, 0) CANDIDATES(2, 0) CANDIDATES(0, 1) CANDIDATES(1, 1) CANDIDATES(2, 1)
#undef CANDIDATES

INLINE void candidates(u32 mb, float d, float g, int gained, int kind, i64 *first, i64 *count) {
    if (gained) {
        if (kind == 0) candidates_01(mb, d, g, first, count);
        else if (kind == 1) candidates_11(mb, d, g, first, count);
        else candidates_21(mb, d, g, first, count);
    } else {
        if (kind == 0) candidates_00(mb, d, g, first, count);
        else if (kind == 1) candidates_10(mb, d, g, first, count);
        else candidates_20(mb, d, g, first, count);
    }
}

static inline i64 f_ord(i64 o, float d, int kind) { /* ordinal(round(value(o) + d)) */
    return ordinal(merged(from_ordinal(o, kind), d, 1.0f, 0, kind), kind);
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

/* The flag (_bits.may_lose) and, where it is set, the run (_codec.candidates), for merged value mb: the
 * scalar path, for the lanes settle() leaves (zero, extreme or non-finite guesses, and long runs, whose
 * ends candidates() finds from estimates in a few evaluations). Returns the flag; first/count are set
 * where it is 1. */
static int classify(u32 mb, u32 g, float d, int kind, i64 *first, i64 *count) {
    int flag;
    if (kind == 0) {
        i64 high = max_finite(kind), low = -1 - high, target = ordinal(mb, kind), o = ordinal(g, kind);
        if (plainly_exact(mb, g, d)) return 0;
        if (o - 1 >= low && o + 1 <= high && (g << 1) != 0) { /* nextafter(g, ±inf) is ordinal o ± 1 */
            flag = f_ord(o, d, kind) != target || f_ord(o - 1, d, kind) == target || f_ord(o + 1, d, kind) == target;
        } else {
            float gv = f_of(g);
            flag = merged(g, d, 1.0f, 0, 0) != mb || merged(b_of(nextafterf(gv, INFINITY)), d, 1.0f, 0, 0) == mb ||
                   merged(b_of(nextafterf(gv, -INFINITY)), d, 1.0f, 0, 0) == mb;
        }
    } else {
        u32 mm = kind == 1 ? 0x7Fu : 0x3FFu;
        u32 mag_g = g & 0x7FFFu, mag_m = mb & 0x7FFFu, mant = mag_g & mm;
        flag = mag_m > (mag_g | mm) || mant == 0 || mant == mm;
    }
    if (flag) candidates(mb, d, 1.0f, 0, kind, first, count);
    return flag;
}

static inline int width_of(i64 count) { /* ceil(log2 count), 0 for count <= 1 */
    return count <= 1 ? 0 : 64 - __builtin_clzll((u64)(count - 1));
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

/* ---- the fast pass: ΔW per row segment, then branch-free loops over CHUNK lanes ------------------ */

#define CHUNK 256
typedef int32_t i32;

/* ΔW for elements [j0, j0 + len) of one row: scale·Σ_k b[k]·A[k, j0 + j], summed k = 0..r-1 in that order,
 * every product and sum rounded to fp32 (no fused multiply-add). _torch.delta computes the same op by op. */
INLINE void delta(const float *restrict A, i64 cols, const float *restrict b, i64 r, float scale, i64 j0,
                  i64 len, float *restrict d) {
    const float *a = A + j0;
    float b0 = b[0];
    for (i64 j = 0; j < len; j++) d[j] = b0 * a[j];
    for (i64 k = 1; k < r; k++) {
        const float *restrict ak = A + k * cols + j0;
        float bk = b[k];
        for (i64 j = 0; j < len; j++) d[j] = d[j] + bk * ak[j];
    }
    for (i64 j = 0; j < len; j++) d[j] = d[j] * scale;
}

/* ordinal() in 32 bits (every format's ordinals fit), and its inverse */
INLINE i32 ord32(u32 b, int kind) {
    if (kind == 0) { i32 s = (i32)b; return s ^ ((s >> 31) & 0x7FFFFFFF); }
    i32 s = (i32)(int16_t)(uint16_t)b;
    return s ^ ((s >> 15) & 0x7FFF);
}

INLINE u32 bits32(i32 o, int kind) {
    if (kind == 0) return (u32)(o ^ ((o >> 31) & 0x7FFFFFFF));
    return (u32)(o ^ ((o >> 31) & 0x7FFF)) & 0xFFFFu;
}

INLINE i32 f32ord(i32 o, float d, float g, int gained, int kind) {
    return ord32(merged(bits32(o, kind), d, g, gained, kind), kind);
}

/* What classify() decides, for the common case, from five evaluations around the guess, branch-free:
 * FLAG as _bits.may_lose; where flagged, the run [o - DOWN, o - DOWN + count) when it is settled by them.
 * SLOW where they cannot tell: a long run (FLAG set: the run comes from candidates()), or for fp32 a zero
 * or extreme guess (FLAG clear: classify() decides the flag too). */
enum { FLAG = 1, SLOW = 2, DOWN = 4, WRONG = 8, COUNT_SHIFT = 4 };

INLINE i32 settle(u32 m, u32 g, float d, int kind) {
    i32 high = (i32)max_finite(kind), low = -1 - high, t = ord32(m, kind), o = ord32(g, kind);
    i32 lo2 = o - 2 < low ? low : o - 2, hi2 = o + 2 > high ? high : o + 2; /* clamped: inner decides */
    i32 lo1 = o - 1 < low ? low : o - 1, hi1 = o + 1 > high ? high : o + 1;
    int inner = (o - 2 >= low) & (o + 2 <= high) & ((g << (33 - nbits(kind))) != 0);
    i32 fl2 = f32ord(lo2, d, 1.0f, 0, kind), fl1 = f32ord(lo1, d, 1.0f, 0, kind), f0 = f32ord(o, d, 1.0f, 0, kind);
    i32 fh1 = f32ord(hi1, d, 1.0f, 0, kind), fh2 = f32ord(hi2, d, 1.0f, 0, kind);
    int down = fl1 == t, up = fh1 == t, flag, unknown;
    if (kind == 0) {
        unknown = !inner;
        flag = ((f0 != t) | down | up) & !unknown;
    } else {
        u32 mm = kind == 1 ? 0x7Fu : 0x3FFu, mag_g = g & 0x7FFFu, mag_m = m & 0x7FFFu, mant = mag_g & mm;
        flag = (mag_m > (mag_g | mm)) | (mant == 0) | (mant == mm);
        unknown = 0;
    }
    int slow = unknown | (flag & (!inner | (f0 != t) | (down & (fl2 == t)) | (up & (fh2 == t))));
    return flag | (slow << 1) | (down << 2) | ((1 + down + up) << COUNT_SHIFT);
}

/* settle() for a row with gain g != 0: the exact flag for every kind (_gain.exact_flag), from the guess
 * and its ordinal neighbours; a guess at either end of the finite range (or beyond) is flagged and SLOW. */
INLINE i32 settle_gain(u32 m, u32 g, float d, float gain, int kind) {
    i32 high = (i32)max_finite(kind), low = -1 - high, t = ord32(m, kind), o = ord32(g, kind);
    int in1 = (o > low) & (o < high), in2 = (o > low + 1) & (o < high - 1);
    i32 lo1 = in1 ? o - 1 : o, hi1 = in1 ? o + 1 : o, lo2 = in2 ? o - 2 : o, hi2 = in2 ? o + 2 : o;
    i32 fl2 = f32ord(lo2, d, gain, 1, kind), fl1 = f32ord(lo1, d, gain, 1, kind), f0 = f32ord(o, d, gain, 1, kind);
    i32 fh1 = f32ord(hi1, d, gain, 1, kind), fh2 = f32ord(hi2, d, gain, 1, kind);
    int down = fl1 == t, up = fh1 == t;
    int flag = !in1 | (f0 != t) | down | up;
    int slow = flag & (!in2 | (f0 != t) | (down & (fl2 == t)) | (up & (fh2 == t)));
    return flag | (slow << 1) | (down << 2) | ((1 + down + up) << COUNT_SHIFT);
}

/* Bit j of the result: lane j has any of the mask's bits (64 lanes). Iterating its set bits replaces a
 * data-dependent branch per lane, which mispredicts often when ~10% of lanes take it at random. */
INLINE u64 lanes_with(const i32 *info, i64 len, i32 mask) {
    u64 bits = 0;
    for (i64 j = 0; j < len; j++) bits |= (u64)((info[j] & mask) != 0) << j;
    return bits;
}

/* Codes are packed back-to-back, least significant bit first, in 32-bit words (as _codec.pack). */
typedef struct { u64 acc; int n_acc; i64 n_words, n_esc, n_flag; } State;

INLINE void put_bits(u32 *words, State *st, u64 v, int width) { /* v < 2^width, width <= 32 */
    st->acc |= v << st->n_acc;
    st->n_acc += width;
    if (st->n_acc >= 32) {
        words[st->n_words++] = (u32)st->acc;
        st->acc >>= 32;
        st->n_acc -= 32;
    }
}

INLINE i64 flush_bits(u32 *words, const State *st) { /* the words used, the last one partial */
    if (st->n_acc > 0) words[st->n_words] = (u32)st->acc;
    return st->n_words + (st->n_acc > 0);
}

typedef struct { const u32 *words; i64 n_words, next; u64 buf; int n_buf; } Reader;

INLINE u64 get_bits(Reader *rd, int width) {
    if (rd->n_buf < width) {
        rd->buf |= (u64)(rd->next < rd->n_words ? rd->words[rd->next] : 0) << rd->n_buf;
        rd->next++;
        rd->n_buf += 32;
    }
    u64 v = rd->buf & ((((u64)1) << width) - 1);
    rd->buf >>= width;
    rd->n_buf -= width;
    return v;
}

/* The run of a lane from its settle() info: 1 if flagged (first, count set), else 0. */
INLINE int run_of(i32 info, u32 m, u32 g, float d, float gain, int gained, int kind, i64 *first, i64 *count) {
    if (info & SLOW) { /* a long run (flag known): its ends from the estimates; else the flag too (plain only) */
        if (!(info & FLAG)) return classify(m, g, d, kind, first, count);
        candidates(m, d, gain, gained, kind, first, count);
        return 1;
    }
    if (!(info & FLAG)) return 0;
    *first = (i64)ord32(g, kind) - ((info & DOWN) ? 1 : 0);
    *count = info >> COUNT_SHIFT;
    return 1;
}

/* Codes and escapes of one merged element (original wb, merged m, guess g), in element order. */
INLINE void encode_one(i64 i, i32 info, u32 wb, u32 m, u32 g, float d, float gain, int gained, int kind,
                       u32 *words, i64 *esc_index, void *esc_bits, State *st) {
    i64 first, count;
    int escape;
    if (run_of(info, m, g, d, gain, gained, kind, &first, &count)) {
        i64 index = ordinal(wb, kind) - first;
        escape = index < 0 || index >= count;
        int width = width_of(count);
        if (width) put_bits(words, st, escape ? 0 : (u64)index, width);
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

/* Unmerge elements [0, n) of a (rows, cols) block in place from its code words (escapes are the caller's, and
 * so are rows with gain 0, which are left as they are). */
INLINE void unmerge_impl(const int kind, const int gained, void *w, i64 cols, const float *A, const float *B, i64 r,
                         float scale, const float *gains, i64 n, const u32 *words, i64 n_words) {
    Reader rd = {words, n_words, 0, 0, 0};
    float d[CHUNK];
    u32 mv[CHUNK], gv[CHUNK];
    i32 info[CHUNK];
    for (i64 row = 0; row * cols < n; row++) {
        float gain = gained ? gains[row] : 1.0f;
        if (gained && gain == 0.0f) continue;
        for (i64 j0 = 0; j0 < cols && row * cols + j0 < n; j0 += CHUNK) {
            i64 base = row * cols + j0, len = cols - j0 < CHUNK ? cols - j0 : CHUNK;
            if (n - base < len) len = n - base;
            delta(A, cols, B + row * r, r, scale, j0, len, d);
            for (i64 j = 0; j < len; j++) {
                mv[j] = load(w, base + j, kind);
                gv[j] = guess_of(mv[j], d[j], gain, gained, kind);
            }
            for (i64 j = 0; j < len; j++)
                info[j] = gained ? settle_gain(mv[j], gv[j], d[j], gain, kind) : settle(mv[j], gv[j], d[j], kind);
            for (i64 j64 = 0; j64 < len; j64 += 64) {
                for (u64 todo = lanes_with(info + j64, len - j64 < 64 ? len - j64 : 64, FLAG | SLOW); todo;
                     todo &= todo - 1) {
                    i64 first, count, j = j64 + __builtin_ctzll(todo);
                    if (!run_of(info[j], mv[j], gv[j], d[j], gain, gained, kind, &first, &count)) continue;
                    int width = width_of(count);
                    gv[j] = from_ordinal(first + (i64)(width ? get_bits(&rd, width) : 0), kind);
                }
            }
            for (i64 j = 0; j < len; j++) store(w, base + j, gv[j], kind);
        }
    }
}

INLINE i64 merge_impl(const int kind, const int gained, void *w, i64 rows, i64 cols, const float *A,
                      const float *B, i64 r, float scale, const float *gains, u32 *words, i64 *esc_index,
                      void *esc_bits, i64 *out) {
    State st = {0, 0, 0, 0, 0};
    float d[CHUNK];
    u32 wv[CHUNK], mv[CHUNK], gv[CHUNK];
    i32 info[CHUNK];
    for (i64 row = 0; row < rows; row++) {
        float gain = gained ? gains[row] : 1.0f;
        int coded = !(gained && gain == 0.0f); /* a row with gain 0 keeps nothing of W: the caller keeps it */
        for (i64 j0 = 0; j0 < cols; j0 += CHUNK) {
            i64 base = row * cols + j0, len = cols - j0 < CHUNK ? cols - j0 : CHUNK;
            int bad = 0;
            delta(A, cols, B + row * r, r, scale, j0, len, d);
            for (i64 j = 0; j < len; j++) wv[j] = load(w, base + j, kind);
            for (i64 j = 0; j < len; j++) mv[j] = merged(wv[j], d[j], gain, gained, kind);
            for (i64 j = 0; j < len; j++) gv[j] = guess_of(mv[j], d[j], gain, gained, kind);
            for (i64 j = 0; j < len; j++) bad |= (!finite(mv[j], kind)) & finite(wv[j], kind);
            if (!coded) {
                for (i64 j = 0; j < len; j++) info[j] = 0;
            } else if (gained) {
                for (i64 j = 0; j < len; j++)
                    info[j] = settle_gain(mv[j], gv[j], d[j], gain, kind) | ((gv[j] != wv[j]) * WRONG);
            } else {
                for (i64 j = 0; j < len; j++) info[j] = settle(mv[j], gv[j], d[j], kind) | ((gv[j] != wv[j]) * WRONG);
            }
            if (bad) { /* some element would overflow: restore what this block merged so far, report it */
                i64 j = 0;
                while (finite(mv[j], kind) || !finite(wv[j], kind)) j++;
                for (i64 k = 0; k < j; k++) { /* the segment's elements before it, as if merged */
                    store(w, base + k, mv[k], kind);
                    if (info[k] & (FLAG | SLOW | WRONG))
                        encode_one(base + k, info[k], wv[k], mv[k], gv[k], d[k], gain, gained, kind, words, esc_index,
                                   esc_bits, &st);
                }
                unmerge_impl(kind, gained, w, cols, A, B, r, scale, gains, base + j, words, flush_bits(words, &st));
                for (i64 k = 0; k < st.n_esc; k++) store(w, esc_index[k], load(esc_bits, k, kind), kind);
                return base + j;
            }
            for (i64 j = 0; j < len; j++) store(w, base + j, mv[j], kind);
            for (i64 j64 = 0; j64 < len; j64 += 64) {
                for (u64 todo = lanes_with(info + j64, len - j64 < 64 ? len - j64 : 64, FLAG | SLOW | WRONG); todo;
                     todo &= todo - 1) {
                    i64 j = j64 + __builtin_ctzll(todo);
                    encode_one(base + j, info[j], wv[j], mv[j], gv[j], d[j], gain, gained, kind, words, esc_index,
                               esc_bits, &st);
                }
            }
        }
    }
    out[0] = flush_bits(words, &st);
    out[1] = st.n_esc;
    out[2] = st.n_flag;
    return -1;
}

/* merge_impl and unmerge_impl compiled once per kind and gain use, each its own function (measured: inlined
 * together into one function, the gain variants slowed the plain ones by 10-20%). */
#define MERGE_FN(k, gd) \
    __attribute__((noinline)) static i64 merge_##k##gd(void *w, i64 rows, i64 cols, const float *A, const float *B, \
        i64 r, float scale, const float *gains, u32 *words, i64 *esc_index, void *esc_bits, i64 *out) { \
        return merge_impl(k, gd, w, rows, cols, A, B, r, scale, gains, words, esc_index, esc_bits, out); } \
    __attribute__((noinline)) static void unmerge_##k##gd(void *w, i64 cols, const float *A, const float *B, i64 r, \
        float scale, const float *gains, i64 n, const u32 *words, i64 n_words) { \
        unmerge_impl(k, gd, w, cols, A, B, r, scale, gains, n, words, n_words); }
MERGE_FN(0, 0) MERGE_FN(1, 0) MERGE_FN(2, 0) MERGE_FN(0, 1) MERGE_FN(1, 1) MERGE_FN(2, 1)
#undef MERGE_FN

/* Merge a (rows, cols) block in place: W' = round(w + d) with d = ΔW of the block (see delta(); A is
 * (r, cols), B the block's (rows, r) rows, both fp32 and contiguous), or W' = round(g·(w + d)) with the
 * block's (rows,) fp32 gains (NULL: none; rows with g == 0 are merged, not coded: the caller keeps them).
 * Codes go into words (n + 2 words at least), escapes into esc_index / esc_bits (n entries at least),
 * n = rows·cols. Returns -1, or the index of the first element whose merged value would be non-finite
 * (W finite): the block is then restored bit-exactly (but for rows with g == 0) before returning.
 * out[0] = words used, out[1] = escapes, out[2] = flagged elements. */
i64 pl_merge(int kind, void *w, i64 rows, i64 cols, const float *A, const float *B, i64 r, float scale,
             const float *gains, u32 *words, i64 *esc_index, void *esc_bits, i64 *out) {
    i64 (*fn)(void *, i64, i64, const float *, const float *, i64, float, const float *, u32 *, i64 *, void *,
              i64 *) = gains ? (kind == 0 ? merge_01 : kind == 1 ? merge_11 : merge_21)
                             : (kind == 0 ? merge_00 : kind == 1 ? merge_10 : merge_20);
    return fn(w, rows, cols, A, B, r, scale, gains, words, esc_index, esc_bits, out);
}

/* Unmerge a (rows, cols) block in place from its code words (the caller writes the escapes, and the rows with
 * gain 0). gains: as for pl_merge. */
void pl_unmerge(int kind, void *w, i64 rows, i64 cols, const float *A, const float *B, i64 r, float scale,
                const float *gains, const u32 *words, i64 n_words) {
    void (*fn)(void *, i64, const float *, const float *, i64, float, const float *, i64, const u32 *, i64) =
        gains ? (kind == 0 ? unmerge_01 : kind == 1 ? unmerge_11 : unmerge_21)
              : (kind == 0 ? unmerge_00 : kind == 1 ? unmerge_10 : unmerge_20);
    fn(w, cols, A, B, r, scale, gains, rows * cols, words, n_words);
}
