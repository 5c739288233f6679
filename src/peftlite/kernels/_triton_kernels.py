"""The Triton merge/unmerge kernel: one pass over W, exact rounding and the exact-unmerge codes in registers.

Each program takes one (BM, BN) tile of the (rows, cols) weight matrix. It computes the tile of
``d = scale·(B @ A)`` in fp32 registers (``tl.dot`` with ``input_precision="ieee"``, in the same order
for merge and unmerge), rounds ``W' = round(w + d)`` to nearest-even with integer ops (the Triton
interpreter truncates fp32 -> bf16 casts, and CI runs the interpreter), and codes every element with the
window code of ``_codec`` (``_window``: ``_codec.window``'s integer and fp32 operations, without a gain).
From W', the guess ``round(W' - d)`` and d alone it gives a window of ``2**width`` consecutive ordinals
holding every original that merges to W' (width 0: the guess is the original); merge stores the original's
offset in its window, unmerge adds it back. No loop depends on the data: per element, the rank sum, three
evaluations of the merged-value function and a few dozen integer ops. See ``codec_kernel``.
"""

from __future__ import annotations

import triton
import triton.language as tl

FP32, BF16, FP16 = 0, 1, 2  # the KIND the host passes
_FP32, _BF16, _FP16 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # the same, readable inside kernels


@triton.jit
def _to_f32(b, KIND: tl.constexpr):
    """Bit pattern (int32 holding 16 or 32 bits) -> fp32 value; exact."""
    if KIND == _FP32:
        return b.to(tl.float32, bitcast=True)
    elif KIND == _BF16:
        return (b << 16).to(tl.float32, bitcast=True)
    else:
        return (b & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round(x, KIND: tl.constexpr):
    """fp32 value -> bit pattern of the weight's dtype, rounded to nearest-even (int32 result)."""
    u = x.to(tl.int32, bitcast=True)
    if KIND == _FP32:
        return u
    elif KIND == _BF16:
        ax = u & 0x7FFFFFFF
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        nan = ((u >> 16) | 0x40)
        return tl.where(ax > 0x7F800000, nan, rounded) & 0xFFFF
    else:
        sign = (u >> 16) & 0x8000
        ax = u & 0x7FFFFFFF
        e = ax >> 23
        # normal halves: rebias the exponent and round the 13 dropped bits to nearest-even
        normal = (ax - 0x38000000 + 0xFFF + ((ax >> 13) & 1)) >> 13
        # subnormal halves: shift the full significand right by 126 - e and round
        mant = (ax & 0x7FFFFF) | 0x800000
        sh = tl.minimum(tl.maximum(126 - e, 1), 31)
        q = mant >> sh
        rem = mant - (q << sh)
        half = 1 << (sh - 1)
        sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        sub = tl.where(e < 102, 0, sub)  # below 2^-25: rounds to zero
        h = tl.where(ax < 0x38800000, sub, normal)
        h = tl.where(ax >= 0x477FF000, 0x7C00, h)  # rounds to infinity
        h = tl.where(ax > 0x7F800000, 0x7E00, h)  # NaN
        return (sign | h) & 0xFFFF


@triton.jit
def _merged(b, d, KIND: tl.constexpr):
    """round(w + d) as bits, for w given as bits."""
    return _round(_to_f32(b, KIND) + d, KIND)


# ---- the in-kernel window code (``_codec.window``): widths, windows, codes and escapes per tile ----

@triton.jit
def _ord(b, KIND: tl.constexpr):
    """Bit patterns (int32 holding 16 or 32 bits) -> int64 ordinals, monotone in value (-0.0 -> -1)."""
    b64 = b.to(tl.int64)
    if KIND == _FP32:
        return tl.where(b64 >= 0, b64, -1 - (b64 & 0x7FFFFFFF))
    else:
        return tl.where(b64 < 0x8000, b64, -1 - (b64 & 0x7FFF))


@triton.jit
def _from_ord(o, KIND: tl.constexpr):
    """int64 ordinals -> bit patterns (int32), the inverse of ``_ord``."""
    if KIND == _FP32:
        return tl.where(o >= 0, o, (-1 - o) - 2147483647 - 1).to(tl.int32)
    else:
        return tl.where(o >= 0, o, (-1 - o) | 0x8000).to(tl.int32)


@triton.jit
def _high(KIND: tl.constexpr):
    """The ordinal of the largest finite value; the lowest finite one is ``-1 - _high``."""
    if KIND == _FP32:
        return 0x7F7FFFFF
    elif KIND == _BF16:
        return 0x7F7F
    else:
        return 0x7BFF


@triton.jit
def _f(o, d, KIND: tl.constexpr):
    """ordinal(round(value(o) + d)) for finite ordinals o."""
    return _ord(_merged(_from_ord(o, KIND), d, KIND), KIND)


@triton.jit
def _exponent(b, KIND: tl.constexpr):
    """The biased exponent field of bit patterns (int32), subnormals and zeros counted as 1; int64."""
    if KIND == _FP32:
        e = (b & 0x7FFFFFFF) >> 23
    elif KIND == _BF16:
        e = (b & 0x7FFF) >> 7
    else:
        e = (b & 0x7FFF) >> 10
    return tl.maximum(e, 1).to(tl.int64)


@triton.jit
def _window(m, g, d, KIND: tl.constexpr):
    """(width, start), int64: each element's code width (0: the guess g is the original) and the first
    ordinal of its window of 2**width, from the merged bits m, the guess bits g and d (``_codec.window``)."""
    HIGH = _high(KIND)
    LOW = -1 - HIGH
    if KIND == _FP32:
        NB: tl.constexpr = 32
        P: tl.constexpr = 23
        BOTTOM: tl.constexpr = -2147483648  # the window of the whole format starts at the lowest ordinal
    elif KIND == _BF16:
        NB: tl.constexpr = 16
        P: tl.constexpr = 7
        BOTTOM: tl.constexpr = -32768
    else:
        NB: tl.constexpr = 16
        P: tl.constexpr = 10
        BOTTOM: tl.constexpr = -32768
    t = _ord(m, KIND)
    o = _ord(g, KIND)
    interior = (o > LOW) & (o < HIGH) & (t >= LOW) & (t <= HIGH)
    at = tl.minimum(tl.maximum(o, LOW + 1), HIGH - 1)
    f_at = _f(at, d, KIND)
    e0 = f_at == t
    e_lo = _f(at - 1, d, KIND) == t
    e_hi = _f(at + 1, d, KIND) == t
    single = interior & e0 & ~e_lo & ~e_hi
    q = tl.maximum(_exponent(m, KIND) - _exponent(g, KIND), 0)
    wide = ~interior | (q >= P)  # an end of the finite range, or a run reaching zero: the whole format
    width = tl.where(wide, NB, q + 1)
    size = tl.full(o.shape, 1, tl.int64) << tl.minimum(width, NB - 1)
    start = tl.where(e0 & ~e_lo, o,
                     tl.where(e0 & ~e_hi, o - size + 1,
                              tl.where(e0, o - size // 2, tl.where(f_at < t, o + 1, o - size))))
    start = tl.where(wide, BOTTOM, start)
    return tl.where(single, 0, width), start


@triton.jit
def codec_kernel(W, A, B, scale, rows, cols, R, stride_ar, stride_ac, stride_br, stride_bc,
                 tiles, tile_off, status, buf, cap_bits, esc_idx, esc_bits, esc_cap, ctr, tiles_n,
                 KIND: tl.constexpr, UNMERGE: tl.constexpr, EXACT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Merge or unmerge one tile with its codes decided in registers.

    merge: writes W' and, for each element of width > 0 (``_window``), ``ordinal(w) - start`` mod 2**32 in
    ``width`` bits at the tile's bit offset (reserved with one atomic add on ``ctr[0]``, stored in
    ``tile_off``) plus the prefix sum of the widths before it, OR-ed into ``buf``. An original the code
    would not give back (outside its window, or a width-0 guess that is not it) goes to the escape list
    (``ctr[1]`` counts) and keeps its bits, zero. A tile that finds ``buf`` or the list full writes
    nothing and records its needs in ``status`` so the host can rerun it. ``ctr[2]``: elements of width
    > 0, ``ctr[3]``: merged values that overflowed, ``ctr[4]``: pending tiles.
    unmerge: recomputes the same windows from W' and d and writes the guess where the width is 0, else
    ``start + code`` (escapes: the host).
    """
    pid = tl.program_id(0)
    tile = tl.load(tiles + pid)
    tm = tile // tiles_n
    tn = tile % tiles_n
    rm = tm * BM + tl.arange(0, BM)
    rn = tn * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, R, BR):
        rk = k0 + tl.arange(0, BR)
        b = tl.load(B + rm[:, None] * stride_br + rk[None, :] * stride_bc,
                    mask=(rm[:, None] < rows) & (rk[None, :] < R), other=0.0)
        a = tl.load(A + rk[:, None] * stride_ar + rn[None, :] * stride_ac,
                    mask=(rk[:, None] < R) & (rn[None, :] < cols), other=0.0)
        acc += tl.dot(b, a, input_precision="ieee")
    d = tl.reshape(acc * scale, (BM * BN,))
    flat = tl.reshape(rm[:, None].to(tl.int64) * cols + rn[None, :], (BM * BN,))
    inside = tl.reshape((rm[:, None] < rows) & (rn[None, :] < cols), (BM * BN,))
    if KIND == _FP32:
        w = tl.load(W + flat, mask=inside, other=0)
    else:
        w = tl.load(W + flat, mask=inside, other=0).to(tl.int32) & 0xFFFF
    if UNMERGE:
        m = w
    else:
        m = _merged(w, d, KIND)
    g = _round(_to_f32(m, KIND) - d, KIND)
    if UNMERGE and not EXACT:
        out = g
    else:
        width, start = _window(m, g, d, KIND)
        width = tl.where(inside, width, 0)
        need = tl.sum(width, axis=0)
        pos = tl.cumsum(width, axis=0) - width  # the element's first bit within the tile
        has = width > 0
        if UNMERGE:
            bit = tl.load(tile_off + tile) + pos
            word = bit >> 5
            shift = (bit & 31).to(tl.int64)
            lo_w = tl.load(buf + word, mask=has, other=0).to(tl.int64) & 0xFFFFFFFF
            hi_w = tl.load(buf + word + 1, mask=has & (shift + width > 32), other=0).to(tl.int64) & 0xFFFFFFFF
            code = ((lo_w | (hi_w << 32)) >> shift) & ((tl.full(shift.shape, 1, tl.int64) << width) - 1)
            o = (start + code) & 0xFFFFFFFF
            out = tl.where(has, _from_ord(tl.where(o >= 2147483648, o - 4294967296, o), KIND), g)
        else:
            code = (_ord(w, KIND) - start) & 0xFFFFFFFF
            escape = inside & tl.where(has, code >= (tl.full(code.shape, 1, tl.int64) << width), g != w)
            n_esc = tl.sum(escape.to(tl.int32), axis=0)
            base = tl.atomic_add(ctr, need.to(tl.int64))
            ebase = tl.atomic_add(ctr + 1, n_esc.to(tl.int64))
            tl.store(tile_off + tile, base)
            out = m
            if (base + need <= cap_bits) & (ebase + n_esc <= esc_cap):
                bit = base + pos
                word = bit >> 5
                shift = (bit & 31).to(tl.int64)
                v = tl.where(escape, 0, code) << shift
                tl.atomic_or(buf + word, (v & 0xFFFFFFFF).to(tl.int32), mask=has)
                tl.atomic_or(buf + word + 1, (v >> 32).to(tl.int32), mask=has & (shift + width > 32))
                epos = ebase + tl.cumsum(escape.to(tl.int32), axis=0) - 1
                tl.store(esc_idx + epos, flat, mask=escape)
                tl.store(esc_bits + epos, w, mask=escape)
                if KIND == _FP32:
                    EXP = 0x7F800000
                elif KIND == _BF16:
                    EXP = 0x7F80
                else:
                    EXP = 0x7C00
                overflow = inside & ((m & EXP) == EXP) & ((w & EXP) != EXP)
                n_bad = tl.sum(overflow.to(tl.int32), axis=0)
                if n_bad > 0:
                    tl.atomic_add(ctr + 3, n_bad.to(tl.int64))
                tl.atomic_add(ctr + 2, tl.sum(has.to(tl.int64), axis=0))
            else:
                tl.store(status + 2 * pid, need + 1)
                tl.store(status + 2 * pid + 1, n_esc)
                tl.atomic_add(ctr + 4, 1)
                inside = inside & (pid < 0)  # write nothing: the host reruns this tile
    if KIND == _FP32:
        tl.store(W + flat, out, mask=inside)
    else:
        tl.store(W + flat, out.to(tl.int16), mask=inside)
