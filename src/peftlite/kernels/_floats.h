/* Bit casts and fp16 <-> fp32 conversions shared by the C kernels (_cpu.c, _dropout.c), torch's to the bit.
 * Include after <stdint.h>, <string.h> and <math.h>, with u32 defined as uint32_t. */
#ifndef PEFTLITE_FLOATS_H
#define PEFTLITE_FLOATS_H

static inline float f_of(u32 b) { float f; memcpy(&f, &b, 4); return f; }
static inline u32 b_of(float f) { u32 b; memcpy(&b, &f, 4); return b; }

static inline float h2f(u32 h) { /* fp16 bits -> fp32, exact; branch-free so that loops vectorise */
    u32 s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    u32 special = s | 0x7F800000u | (m << 13);                 /* inf or NaN */
    u32 small = s | b_of((float)m * 0x1p-24f);                 /* zero or subnormal: m·2^-24 is exact */
    u32 normal = s | ((e + 112) << 23) | (m << 13);
    return f_of(e == 0x1F ? special : e == 0 ? small : normal);
}

static inline u32 f2h(float f) { /* fp32 -> fp16 bits, round to nearest even (the FP16 library's method, as torch) */
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    u32 w = b_of(f), shl1 = w + w, sign = w & 0x80000000u, bias = shl1 & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f_of((bias >> 1) + 0x07800000u) + base;
    u32 b = b_of(base), nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
    return (sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign);
}

#endif
