/* One fused pass per block for the torch backend's exact merge/unmerge on the CPU (see _cpu.py).
 *
 * It implements exactly the scheme of _torch.delta and _codec (docs/exact-unmerge.md), element by element:
 * the same ΔW, the same windows, the same codes in the same bit-plane layout, the same escapes. So its
 * records are bit-identical to the torch-op implementation's, and either decodes the other's. Every loop
 * over the lanes of a chunk is branch-free and written to vectorise; a group's bit plane is appended with
 * one pext and read back with one pdep (BMI2; a portable loop in the baseline build). Built with
 * -ffp-contract=off: every product and sum is one fp32 operation, rounded once, in vectorised code as in
 * scalar code.
 *
 * With per-row gains (DoRA, _gain.py; gains != NULL) the merged value is round(fp32(fp32(w + d)·g)), the
 * guess round(fp32(W'/g) - d), the windows take the gain, and rows with g == 0 get no codes (the caller
 * keeps them). "gained" is a compile-time constant in each instantiation, so plain merges pay nothing.
 *
 * kind: 0 fp32, 1 bf16, 2 fp16. Weights are passed as raw bits (uint32 or uint16 arrays).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__BMI2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef int64_t i64;
typedef uint32_t u32;
typedef uint64_t u64;
#define INLINE static inline __attribute__((always_inline))

#include "_floats.h"

/* ---- the pass: ΔW per row segment, then branch-free loops over CHUNK lanes --------------------- */

#define CHUNK 256 /* lanes per step; a multiple of GROUP, so a row's groups never straddle two steps */
#define GROUP 64  /* columns per group of the bit-plane layout (_codec.GROUP) */
typedef int32_t i32;


/* ΔW for elements [j0, j0 + len) of one row: scale·Σ_k b[k]·A[k, j0 + j], summed k = 0..r-1 in that order,
 * every product and sum rounded to fp32 (no fused multiply-add). _torch.delta computes the same op by op. */
INLINE void delta(const float *restrict A, i64 lda, const float *restrict b, i64 r, float scale, i64 j0,
                  i64 len, float *restrict d) {
    const float *a = A + j0;
    for (i64 j = 0; j < len; j++) d[j] = b[0] * a[j];
    for (i64 k = 1; k < r; k++)
        for (i64 j = 0; j < len; j++) d[j] = d[j] + b[k] * a[k * lda + j];
    for (i64 j = 0; j < len; j++) d[j] = d[j] * scale;
}

typedef float vf16 __attribute__((vector_size(64))); /* 16 lanes (GCC/clang vector extensions) */
INLINE vf16 loadv(const float *p) { vf16 v; memcpy(&v, p, sizeof v); return v; }
INLINE void storev(float *p, vf16 v) { memcpy(p, &v, sizeof v); }

/* Columns [j, j + 16) of rows [0, nr), over k in [k0, k0 + K): A's K vectors held in registers, every row's
 * sum continued in order (first: the sum starts with the product at k0; last: then times the scale), so the
 * result is delta()'s. */
#define DELTA_RUN(K) \
INLINE void delta_run##K(const float *a, i64 lda, const float *b, i64 r, i64 k0, int first, int last, float scale, \
                         i64 nr, float *D, i64 ldd) { \
    vf16 ak[K]; \
    for (int k = 0; k < K; k++) ak[k] = loadv(a + (k0 + k) * lda); \
    for (i64 i = 0; i < nr; i++) { \
        const float *bi = b + i * r + k0; \
        vf16 s = first ? bi[0] * ak[0] : loadv(D + i * ldd) + bi[0] * ak[0]; \
        for (int k = 1; k < K; k++) s = s + bi[k] * ak[k]; \
        storev(D + i * ldd, last ? s * scale : s); \
    } \
}
DELTA_RUN(16) DELTA_RUN(8) DELTA_RUN(4) DELTA_RUN(1)
#undef DELTA_RUN

/* ΔW of rows [row0, row0 + nr) of the block, every column, into D (nr·cols floats): 16 columns at a time, A's
 * values for them held in registers over runs of 16, 8, 4 and 1 ranks while every row of the group is summed
 * (in delta()'s order), which measured 1.4x faster than streaming A from L1 row by row. */
INLINE void deltas(const float *A, i64 lda, const float *B, i64 r, float scale, i64 row0, i64 nr, i64 cols,
                   float *D) {
    const float *b = B + row0 * r;
    i64 full = cols - cols % 16;
    for (i64 j = 0; j < full; j += 16) {
        i64 k = 0;
        for (; k + 16 <= r; k += 16) delta_run16(A + j, lda, b, r, k, k == 0, k + 16 == r, scale, nr, D + j, cols);
        for (; k + 8 <= r; k += 8) delta_run8(A + j, lda, b, r, k, k == 0, k + 8 == r, scale, nr, D + j, cols);
        for (; k + 4 <= r; k += 4) delta_run4(A + j, lda, b, r, k, k == 0, k + 4 == r, scale, nr, D + j, cols);
        for (; k < r; k++) delta_run1(A + j, lda, b, r, k, k == 0, k + 1 == r, scale, nr, D + j, cols);
    }
    for (i64 i = 0; i < nr; i++) delta(A, lda, b + i * r, r, scale, full, cols - full, D + i * cols + full); /* tail */
}

static inline int nbits(int kind) { return kind == 0 ? 32 : 16; }
static inline i64 max_finite(int kind) { return kind == 0 ? 0x7F7FFFFF : kind == 1 ? 0x7F7F : 0x7BFF; }

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

/* The bit pattern of an ordinal (ordinal()'s inverse, in 32 bits: every format's ordinals fit). */
INLINE u32 bits32(i32 o, int kind) {
    if (kind == 0) return (u32)(o ^ ((o >> 31) & 0x7FFFFFFF));
    return (u32)(o ^ ((o >> 31) & 0x7FFF)) & 0xFFFFu;
}

/* ---- the scheme on LANES lanes at once (GCC/clang vector extensions, one register of the ISA built for).
 * Comparisons give lane masks (-1 or 0); sel() blends by a mask. ---------------------------------------------- */

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX2__)
#define LANES 8
#else
#define LANES 4
#endif
typedef u32 vu __attribute__((vector_size(4 * LANES)));
typedef i32 vi __attribute__((vector_size(4 * LANES)));
typedef float vf __attribute__((vector_size(4 * LANES)));
#define SPLAT(c) ((vu){0} + (u32)(c))

INLINE vu sel(vi mask, vu a, vu b) { return ((vu)mask & a) | (~(vu)mask & b); }
INLINE vu load_u(const u32 *p) { vu v; memcpy(&v, p, sizeof v); return v; }
INLINE vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_u(u32 *p, vu v) { memcpy(p, &v, sizeof v); }

#ifdef __AVX512F__
/* fp16 <-> fp32 by the hardware (AVX-512 implies F16C): exact one way, nearest-even the other, as h2f / f2h
 * (with nan, a NaN comes out as f2h's 0x7E00 with its sign). h2f_v quiets a signalling NaN, which h2f does not,
 * but every value it gives is then added to or divided by a float, which quiets it anyway. */
INLINE vf h2f_v(vu h) { return (vf)_mm512_cvtph_ps(_mm512_cvtepi32_epi16((__m512i)h)); }
INLINE vu f2h_v(vf f, int nan) {
    vu w = (vu)f, h = (vu)_mm512_cvtepu16_epi32(_mm512_cvtps_ph((__m512)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return nan ? sel((w & 0x7FFFFFFFu) > 0x7F800000u, ((w >> 16) & 0x8000u) | 0x7E00u, h) : h;
}
#else
INLINE vf h2f_v(vu h) { /* h2f on every lane */
    vu s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    vu special = s | 0x7F800000u | (m << 13);
    vu small = s | (vu)(__builtin_convertvector((vi)m, vf) * 0x1p-24f);
    vu normal = s | ((e + 112u) << 23) | (m << 13);
    return (vf)sel(e == 0x1Fu, special, sel(e == 0u, small, normal));
}

INLINE vu f2h_v(vf f, int nan) { /* f2h on every lane (a NaN's bits unspecified without nan) */
    vu w = (vu)f, shl1 = w + w, sign = w & 0x80000000u, bias = shl1 & 0xFF000000u;
    vf base = ((vf)(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    bias = sel(bias < 0x71000000u, SPLAT(0x71000000u), bias);
    base = (vf)((bias >> 1) + 0x07800000u) + base;
    vu b = (vu)base, nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
    return (sign >> 16) | (nan ? sel(shl1 > 0xFF000000u, SPLAT(0x7E00u), nonsign) : nonsign);
}

#endif

INLINE vu f2bf_v(vf f, int nan) { /* fp32 -> bf16 bits, round to nearest even; with nan, NaN -> 0x7FC0 (torch) */
    vu u = (vu)f, r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return nan ? sel((u & 0x7FFFFFFFu) > 0x7F800000u, SPLAT(0x7FC0u), r) : r;
}

INLINE vf value_v(vu b, int kind) { return kind == 0 ? (vf)b : kind == 1 ? (vf)(b << 16) : h2f_v(b); }
/* x rounded to W's format; a NaN gets torch's bits with nan, else unspecified ones (the window reads only
 * finite guesses and evaluations: a NaN one marks a lane wide, whose code does not depend on it) */
INLINE vu rounded_v(vf x, int kind, int nan) { return kind == 0 ? (vu)x : kind == 1 ? f2bf_v(x, nan) : f2h_v(x, nan); }

/* round(w + d) and round(W' - d), as _bits.merged_value / unmerged_guess; with a gain (gained),
 * round(fp32(fp32(w + d)·g)) and round(fp32(fp32(W'/g) - d)) */
INLINE vu merged_v(vu wb, vf d, float g, int gained, int kind, int nan) {
    vf t = value_v(wb, kind) + d;
    return rounded_v(gained ? t * g : t, kind, nan);
}
INLINE vu guess_v(vu mb, vf d, float g, int gained, int kind) {
    vf v = value_v(mb, kind);
    return rounded_v((gained ? v / g : v) - d, kind, 0);
}

INLINE vi ord_v(vu b, int kind) {
    if (kind == 0) { vi s = (vi)b; return s ^ ((s >> 31) & 0x7FFFFFFF); }
    vi s = (vi)(b << 16) >> 16;
    return s ^ ((s >> 15) & 0x7FFF);
}

INLINE vu bits_v(vi o, int kind) {
    if (kind == 0) return (vu)(o ^ ((o >> 31) & 0x7FFFFFFF));
    return (vu)(o ^ ((o >> 31) & 0x7FFF)) & 0xFFFFu;
}

INLINE vi exponent_v(vu b, int kind) { /* the biased exponent field, subnormals and zeros counted as 1 */
    vi e = (vi)(kind == 0 ? (b >> 23) & 0xFFu : kind == 1 ? (b >> 7) & 0xFFu : (b >> 10) & 0x1Fu);
    return (vi)sel(e < 1, SPLAT(1), (vu)e);
}

INLINE vi finite_v(vu b, int kind) {
    u32 e = kind == 0 ? 0x7F800000u : kind == 1 ? 0x7F80u : 0x7C00u;
    return (b & e) != e;
}

/* _codec.window on every lane: each code's width (0: the guess is the original) and its window's start, an
 * ordinal taken mod 2^32 (as _codec does). eg is the gain's unbiased exponent (0 without a gain), neg whether
 * the gain is negative. */
INLINE vi window_v(vu mb, vu gb, vf d, float gain, i32 eg, i32 neg, int gained, int kind, vu *start) {
    const i32 high = (i32)max_finite(kind), nb = nbits(kind);
    const i32 mant = kind == 0 ? 23 : kind == 1 ? 7 : 10;
    const u32 magnitude = kind == 0 ? 0x7FFFFFFFu : 0x7FFFu;
    vi t = ord_v(mb, kind), o = ord_v(gb, kind);
    /* low < o < high and low <= t <= high, on magnitudes: ordinal -1 - x is the negative of magnitude x */
    vi interior = ((gb & magnitude) < (u32)high) & ((mb & magnitude) <= (u32)high);
    /* f at the guess and its two neighbours; only interior lanes read them (the others are wide), so the guess
     * need not be clamped as _codec does, and the neighbours' ordinals wrap harmlessly */
    vi f0 = ord_v(merged_v(gb, d, gain, gained, kind, 0), kind);
    vu fl = merged_v(bits_v((vi)((vu)o - 1u), kind), d, gain, gained, kind, 0);
    vu fh = merged_v(bits_v((vi)((vu)o + 1u), kind), d, gain, gained, kind, 0);
    vi e0 = f0 == t, el = fl == mb, eh = fh == mb, above = (f0 < t) ^ -neg; /* equal bits: equal ordinals */
    vi single = interior & e0 & ~el & ~eh;
    vi q = exponent_v(mb, kind) - exponent_v(gb, kind) - eg;
    q &= ~(q >> 31); /* max(q, 0) */
    vi wide = ~interior | (q >= mant); /* the run reaches zero: the estimate no longer holds */
    vu size = SPLAT(1) << ((vu)(q + 1) & 31u), uo = (vu)o; /* read only where not wide: q + 1 <= mant */
    vu s = sel(e0 & ~el, uo, sel(e0 & ~eh, uo - size + 1u, sel(e0, uo - (size >> 1), sel(above, uo + 1u, uo - size))));
    *start = sel(wide, SPLAT(0u - (1u << (nb - 1))), s);
    return (vi)sel(single, SPLAT(0), sel(wide, SPLAT(nb), (vu)(q + 1)));
}

/* Lanes [base, base + len) of W as 32-bit bit patterns, and their deltas: W and d themselves for fp32 when len is
 * whole vectors, else copied (widened) into wbuf / dbuf and padded with zeros to whole vectors. */
INLINE const u32 *lanes(const void *w, i64 base, i64 len, int kind, u32 *wbuf, const float **d, float *dbuf) {
    if (kind == 0 && len % LANES == 0) return (const u32 *)w + base;
    i64 padded = (len + LANES - 1) / LANES * LANES;
    for (i64 j = 0; j < padded; j++) wbuf[j] = j < len ? load(w, base + j, kind) : 0u;
    if (len % LANES) {
        for (i64 j = 0; j < padded; j++) dbuf[j] = j < len ? (*d)[j] : 0.0f;
        *d = dbuf;
    }
    return wbuf;
}

INLINE i32 any_lane(vi mask) {
    i32 any = 0;
    for (int k = 0; k < LANES; k++) any |= mask[k];
    return any;
}

/* Merge lanes [0, len) of a chunk: each merged value, code width (0 where the row is not coded), escape flag
 * and code (the offset in the window; 0 where none is stored or the lane escapes). Returns the lane masks of
 * merged values that overflow (W finite), OR-ed over the chunk's vectors, and in *escaped those of escapes. */
INLINE vi encode(const u32 *wv, const float *d, i64 len, float gain, i32 eg, i32 neg, int coded, int gained,
                 int kind, u32 *mv, i32 *width, i32 *escape, u32 *code, vi *escaped) {
    vi bad = {0}, esc = {0};
    for (i64 j = 0; j < len; j += LANES) {
        vf dj = load_f(d + j);
        vu wb = load_u(wv + j), mb = merged_v(wb, dj, gain, gained, kind, 1), gb = guess_v(mb, dj, gain, gained, kind);
        vu start;
        vi wd = window_v(mb, gb, dj, gain, eg, neg, gained, kind, &start);
        vu off = (vu)ord_v(wb, kind) - start;
        vi has = wd != 0, held = (wd == 32) | ((off >> (vu)(wd & 31)) == 0);
        vi miss = (vi)sel(has, (vu)~held, (vu)(gb != wb)) & -coded;
        store_u(mv + j, mb);
        store_u((u32 *)width + j, (vu)(wd & -coded));
        store_u((u32 *)escape + j, (vu)miss);
        store_u(code + j, sel(has & ~miss, off, SPLAT(0)));
        bad |= ~finite_v(mb, kind) & finite_v(wb, kind);
        esc |= miss;
    }
    *escaped = esc;
    return bad;
}

/* Unmerge's half: each lane's guess, code width and window start, from the merged values. */
INLINE void windows(const u32 *mv, const float *d, i64 len, float gain, i32 eg, i32 neg, int gained, int kind,
                    u32 *gv, i32 *width, u32 *start) {
    for (i64 j = 0; j < len; j += LANES) {
        vf dj = load_f(d + j);
        vu mb = load_u(mv + j), gb = guess_v(mb, dj, gain, gained, kind), st;
        store_u(gv + j, gb);
        store_u((u32 *)width + j, (vu)window_v(mb, gb, dj, gain, eg, neg, gained, kind, &st));
        store_u(start + j, st);
    }
}

/* The bit stream of a block: least significant bit first, in 32-bit words (as _codec.pack). */
typedef struct { u64 acc; int n_acc; i64 n_words; } Writer;

INLINE void put_bits(u32 *words, Writer *st, u64 v, int n) { /* v < 2^n, n <= 32; branch-free */
    u64 acc = st->acc | (v << st->n_acc);
    int n_acc = st->n_acc + n, full = n_acc >= 32;
    words[st->n_words] = (u32)acc; /* the partial word too: words has room for one more */
    st->n_words += full;
    st->acc = full ? acc >> 32 : acc;
    st->n_acc = n_acc - 32 * full;
}

INLINE i64 flush_bits(u32 *words, const Writer *st) { /* the words used, the last one partial */
    if (st->n_acc > 0) words[st->n_words] = (u32)st->acc;
    return st->n_words + (st->n_acc > 0);
}

typedef struct { const u32 *words; i64 n_words, next; u64 buf; int n_buf; } Reader;

INLINE u64 get_bits(Reader *rd, int n) { /* n <= 32; branch-free */
    int refill = rd->n_buf < n;
    u64 next = rd->next < rd->n_words ? rd->words[rd->next] : 0;
    u64 buf = rd->buf | (refill ? next << rd->n_buf : 0);
    rd->next += refill;
    rd->n_buf += 32 * refill;
    u64 v = buf & ((((u64)1) << n) - 1);
    rd->buf = buf >> n;
    rd->n_buf -= n;
    return v;
}

#ifdef __BMI2__
INLINE u64 extract(u64 v, u64 mask) { return _pext_u64(v, mask); }
INLINE u64 deposit(u64 v, u64 mask) { return _pdep_u64(v, mask); }
#else
INLINE u64 extract(u64 v, u64 mask) { /* the bits of v where mask is set, packed low (pext) */
    u64 out = 0;
    for (int k = 0; mask; mask &= mask - 1, k++) out |= ((v >> __builtin_ctzll(mask)) & 1) << k;
    return out;
}
INLINE u64 deposit(u64 v, u64 mask) { /* the low bits of v spread to where mask is set (pdep) */
    u64 out = 0;
    for (int k = 0; mask; mask &= mask - 1, k++) out |= ((v >> k) & 1) << __builtin_ctzll(mask);
    return out;
}
#endif

/* Bit j of the result: lane j has width[j] > b (len <= 64 lanes). */
INLINE u64 wider_than(const i32 *width, i64 len, i32 b) {
    u64 bits = 0;
    for (i64 j = 0; j < len; j++) bits |= (u64)(width[j] > b) << j;
    return bits;
}

/* Bit j of the result: bit b of code[j] (len <= 64 lanes). */
INLINE u64 plane_of(const u32 *code, i64 len, i32 b) {
    u64 bits = 0;
    for (i64 j = 0; j < len; j++) bits |= (u64)((code[j] >> b) & 1u) << j;
    return bits;
}

/* code[j] |= 1 << b where bit j of plane is set (len <= 64 lanes). */
INLINE void set_plane(u32 *code, i64 len, i32 b, u64 plane) {
    for (i64 j = 0; j < len; j++) code[j] |= (u32)((plane >> j) & 1u) << b;
}

INLINE i32 widest(const i32 *width, i64 len) {
    i32 top = 0;
    for (i64 j = 0; j < len; j++) top = width[j] > top ? width[j] : top;
    return top;
}

#ifdef __AVX512F__
/* A whole group of 64 lanes in four registers: its widths, codes and widest code. */
typedef struct { __m512i width[4], code[4]; i32 top; } Group;

INLINE Group load_group(const i32 *width, const u32 *code) {
    Group g;
    __m512i top = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++) {
        g.width[i] = _mm512_loadu_si512(width + 16 * i);
        g.code[i] = code ? _mm512_loadu_si512(code + 16 * i) : _mm512_setzero_si512();
        top = _mm512_max_epi32(top, g.width[i]);
    }
    g.top = _mm512_reduce_max_epi32(top);
    return g;
}

INLINE u64 wider_than64(const Group *g, i32 b) { /* bit j: lane j's width > b */
    u64 bits = 0;
    for (int i = 0; i < 4; i++) bits |= (u64)_mm512_cmpgt_epi32_mask(g->width[i], _mm512_set1_epi32(b)) << (16 * i);
    return bits;
}
#endif

/* Append one group's codes (len <= GROUP lanes) plane by plane: bit b of every code wider than b. */
INLINE void put_group(u32 *words, Writer *st, const i32 *width, const u32 *code, i64 len) {
#ifdef __AVX512F__
    if (len == GROUP) {
        Group g = load_group(width, code);
        for (i32 b = 0; b < g.top; b++) {
            u64 mask = wider_than64(&g, b), plane = 0;
            for (int i = 0; i < 4; i++)
                plane |= (u64)_mm512_test_epi32_mask(g.code[i], _mm512_set1_epi32(1 << b)) << (16 * i);
            u64 v = extract(plane, mask);
            int n = __builtin_popcountll(mask);
            put_bits(words, st, v & 0xFFFFFFFFu, n < 32 ? n : 32);
            if (n > 32) put_bits(words, st, v >> 32, n - 32);
        }
        return;
    }
#endif
    for (i32 b = 0, top = widest(width, len); b < top; b++) {
        u64 mask = wider_than(width, len, b), v = extract(plane_of(code, len, b), mask);
        int n = __builtin_popcountll(mask);
        put_bits(words, st, v & 0xFFFFFFFFu, n < 32 ? n : 32);
        if (n > 32) put_bits(words, st, v >> 32, n - 32);
    }
}

/* Read one group's codes back (code[j] = 0 where width[j] = 0). */
INLINE void get_group(Reader *rd, const i32 *width, u32 *code, i64 len) {
#ifdef __AVX512F__
    if (len == GROUP) {
        Group g = load_group(width, NULL);
        for (i32 b = 0; b < g.top; b++) {
            u64 mask = wider_than64(&g, b);
            int n = __builtin_popcountll(mask);
            u64 v = get_bits(rd, n < 32 ? n : 32);
            if (n > 32) v |= get_bits(rd, n - 32) << 32;
            u64 plane = deposit(v, mask);
            for (int i = 0; i < 4; i++)
                g.code[i] = _mm512_mask_or_epi32(g.code[i], (__mmask16)(plane >> (16 * i)), g.code[i],
                                                 _mm512_set1_epi32(1 << b));
        }
        for (int i = 0; i < 4; i++) _mm512_storeu_si512(code + 16 * i, g.code[i]);
        return;
    }
#endif
    for (i64 j = 0; j < len; j++) code[j] = 0;
    for (i32 b = 0, top = widest(width, len); b < top; b++) {
        u64 mask = wider_than(width, len, b);
        int n = __builtin_popcountll(mask);
        u64 v = get_bits(rd, n < 32 ? n : 32);
        if (n > 32) v |= get_bits(rd, n - 32) << 32;
        set_plane(code, len, b, deposit(v, mask));
    }
}

INLINE float row_gain(const float *gains, i64 row, int gained, i32 *eg, i32 *neg) {
    float gain = gained ? gains[row] : 1.0f;
    *eg = gained ? (i32)((b_of(gain) >> 23) & 0xFFu) - 127 : 0;
    *neg = gained && gain < 0.0f;
    return gain;
}

/* Unmerge elements [0, n) of a (rows, cols) block in place from its code words (escapes are the caller's, and
 * so are rows with gain 0, which are left as they are). n is a multiple of CHUNK or ends a row. work: room for
 * the ΔW of work_rows rows (work_rows·cols floats). */
INLINE void unmerge_impl(const int kind, const int gained, void *w, i64 cols, const float *A, i64 lda, const float *B, i64 r,
                         float scale, const float *gains, float *work, i64 work_rows, i64 n, const u32 *words, i64 n_words) {
    Reader rd = {words, n_words, 0, 0, 0};
    const i64 rows = (n + cols - 1) / cols;
    u32 buf[CHUNK], gv[CHUNK], code[CHUNK], start[CHUNK];
    i32 width[CHUNK];
    float dbuf[CHUNK];
    for (i64 row = 0; row * cols < n; row++) {
        i32 eg, neg;
        float gain = row_gain(gains, row, gained, &eg, &neg);
        if (r > 0 && row % work_rows == 0) deltas(A, lda, B, r, scale, row, row + work_rows <= rows ? work_rows : rows - row,
                                         cols, work);
        if (gained && gain == 0.0f) continue;
        for (i64 j0 = 0; j0 < cols && row * cols + j0 < n; j0 += CHUNK) {
            i64 base = row * cols + j0, len = cols - j0 < CHUNK ? cols - j0 : CHUNK;
            const float *d = work + (row % work_rows) * cols + j0;
            if (n - base < len) len = n - base;
            const u32 *mv = lanes(w, base, len, kind, buf, &d, dbuf);
            windows(mv, d, len, gain, eg, neg, gained, kind, gv, width, start);
            for (i64 g0 = 0; g0 < len; g0 += GROUP)
                get_group(&rd, width + g0, code + g0, len - g0 < GROUP ? len - g0 : GROUP);
            for (i64 j = 0; j < len; j++)
                store(w, base + j, width[j] ? bits32((i32)(start[j] + code[j]), kind) : gv[j], kind);
        }
    }
}

INLINE i64 merge_impl(const int kind, const int gained, void *w, i64 rows, i64 cols, const float *A, i64 lda,
                      const float *B, i64 r, float scale, const float *gains, float *work, i64 work_rows, u32 *words, i64 *esc_index,
                      void *esc_bits, i64 *out) {
    Writer st = {0, 0, 0};
    i64 n_esc = 0, n_coded = 0;
    u32 buf[CHUNK], mv[CHUNK], code[CHUNK];
    i32 width[CHUNK], escape[CHUNK];
    float dbuf[CHUNK];
    for (i64 row = 0; row < rows; row++) {
        i32 eg, neg;
        float gain = row_gain(gains, row, gained, &eg, &neg);
        int coded = !(gained && gain == 0.0f); /* a row with gain 0 keeps nothing of W: the caller keeps it */
        if (r > 0 && row % work_rows == 0) deltas(A, lda, B, r, scale, row, row + work_rows <= rows ? work_rows : rows - row,
                                         cols, work);
        for (i64 j0 = 0; j0 < cols; j0 += CHUNK) {
            i64 base = row * cols + j0, len = cols - j0 < CHUNK ? cols - j0 : CHUNK;
            const float *d = work + (row % work_rows) * cols + j0;
            const u32 *wv = lanes(w, base, len, kind, buf, &d, dbuf);
            vi escaped, bad = encode(wv, d, len, gain, eg, neg, coded, gained, kind, mv, width, escape, code, &escaped);
            if (any_lane(bad)) { /* some element would overflow: take back what this block merged so far, report it */
                i64 j = 0;
                while (finite(mv[j], kind) || !finite(wv[j], kind)) j++;
                unmerge_impl(kind, gained, w, cols, A, lda, B, r, scale, gains, work, work_rows, base, words, flush_bits(words, &st));
                for (i64 k = 0; k < n_esc; k++) store(w, esc_index[k], load(esc_bits, k, kind), kind);
                return base + j;
            }
            for (i64 j = 0; j < len; j++) n_coded += width[j] != 0;
            for (i64 g0 = 0; g0 < len; g0 += GROUP) {
                i64 glen = len - g0 < GROUP ? len - g0 : GROUP;
                put_group(words, &st, width + g0, code + g0, glen);
            }
            for (i64 j = 0; any_lane(escaped) && j < len; j++) /* escapes are rare: a scalar scan where there are */
                if (escape[j]) {
                    esc_index[n_esc] = base + j;
                    store(esc_bits, n_esc, wv[j], kind);
                    n_esc++;
                }
            for (i64 j = 0; j < len; j++) store(w, base + j, mv[j], kind);
        }
    }
    out[0] = flush_bits(words, &st);
    out[1] = n_esc;
    out[2] = n_coded;
    return -1;
}

/* merge_impl and unmerge_impl compiled once per kind and gain use, each its own function (measured: inlined
 * together into one function, the gain variants slowed the plain ones by 10-20%). */
#define MERGE_FN(k, gd) \
    __attribute__((noinline)) static i64 merge_##k##gd(void *w, i64 rows, i64 cols, const float *A, i64 lda, const float *B, \
        i64 r, float scale, const float *gains, float *work, i64 work_rows, u32 *words, i64 *esc_index, void *esc_bits, i64 *out) { \
        return merge_impl(k, gd, w, rows, cols, A, lda, B, r, scale, gains, work, work_rows, words, esc_index, esc_bits, out); } \
    __attribute__((noinline)) static void unmerge_##k##gd(void *w, i64 cols, const float *A, i64 lda, const float *B, i64 r, \
        float scale, const float *gains, float *work, i64 work_rows, i64 n, const u32 *words, i64 n_words) { \
        unmerge_impl(k, gd, w, cols, A, lda, B, r, scale, gains, work, work_rows, n, words, n_words); }
MERGE_FN(0, 0) MERGE_FN(1, 0) MERGE_FN(2, 0) MERGE_FN(0, 1) MERGE_FN(1, 1) MERGE_FN(2, 1)
#undef MERGE_FN

/* Merge a (rows, cols) block in place: W' = round(w + d) with d = ΔW of the block (see delta(); A is
 * (r, cols) with rows lda floats apart, B the block's (rows, r) rows, both fp32), or W' = round(g·(w + d)) with the
 * block's (rows,) fp32 gains (NULL: none; rows with g == 0 are merged, not coded: the caller keeps them).
 * work: room for the ΔW of work_rows rows (work_rows·cols floats), computed work_rows rows at a time; with r == 0,
 * the block's ΔW itself (rows·cols floats, work_rows >= rows), given by the caller (A and B unused).
 * Codes go into words (n + 2 words at least), escapes into esc_index / esc_bits (n entries at least),
 * n = rows·cols. Returns -1, or the index of the first element whose merged value would be non-finite
 * (W finite): the block is then restored bit-exactly (but for rows with g == 0) before returning.
 * out[0] = words used, out[1] = escapes, out[2] = coded elements (width > 0). */
i64 pl_merge(int kind, void *w, i64 rows, i64 cols, const float *A, i64 lda, const float *B, i64 r, float scale,
             const float *gains, float *work, i64 work_rows, u32 *words, i64 *esc_index, void *esc_bits, i64 *out) {
    i64 (*fn)(void *, i64, i64, const float *, i64, const float *, i64, float, const float *, float *, i64, u32 *,
              i64 *, void *, i64 *) = gains ? (kind == 0 ? merge_01 : kind == 1 ? merge_11 : merge_21)
                             : (kind == 0 ? merge_00 : kind == 1 ? merge_10 : merge_20);
    return fn(w, rows, cols, A, lda, B, r, scale, gains, work, work_rows, words, esc_index, esc_bits, out);
}

/* Unmerge a (rows, cols) block in place from its code words (the caller writes the escapes, and the rows with
 * gain 0). gains: as for pl_merge. */
void pl_unmerge(int kind, void *w, i64 rows, i64 cols, const float *A, i64 lda, const float *B, i64 r, float scale,
                const float *gains, float *work, i64 work_rows, const u32 *words, i64 n_words) {
    void (*fn)(void *, i64, const float *, i64, const float *, i64, float, const float *, float *, i64, i64, const u32 *,
               i64) =
        gains ? (kind == 0 ? unmerge_01 : kind == 1 ? unmerge_11 : unmerge_21)
              : (kind == 0 ? unmerge_00 : kind == 1 ? unmerge_10 : unmerge_20);
    fn(w, cols, A, lda, B, r, scale, gains, work, work_rows, rows * cols, words, n_words);
}
