"""The Triton merge/unmerge kernel: one pass over W, exact rounding and the exact-unmerge codes in registers.

Each program takes one (BM, BN) tile of the (rows, cols) weight matrix. It computes the tile of
``d = scale·(B @ A)`` in fp32 registers (``tl.dot`` with ``input_precision="ieee"``, in the same order
for merge and unmerge), rounds ``W' = round(w + d)`` to nearest-even with integer ops (the Triton
interpreter truncates fp32 -> bf16 casts, and CI runs the interpreter), and for every element finds
the run of originals that merge to W' (``_runs``: settled from the evaluations at the guess's
neighbours, a search from an estimate of the run's ends otherwise). See ``codec_kernel``.
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


# ---- the in-kernel codec: candidate runs, codes and escapes decided per tile ----------------------

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
def _pred(o, d, target, STRICT: tl.constexpr, KIND: tl.constexpr):
    """f(o) >= target (STRICT: > target), monotone in o; true beyond the largest finite ordinal."""
    HIGH = _high(KIND)
    f = _f(tl.minimum(o, HIGH), d, KIND)
    if STRICT:
        p = f > target
    else:
        p = f >= target
    return p | (o > HIGH)


@triton.jit
def _first_true(pc, pm, pp, c, est, d, target, active, STRICT: tl.constexpr, KIND: tl.constexpr):
    """Per element, the smallest ordinal with ``_pred`` true, given its values at c - 1, c, c + 1.

    Most elements are settled by those three; the rest restart from ``est`` (a step or two from the
    answer whatever the run's length), gallop and bisect, all lanes of the tile together, until every
    active lane has converged (``lo`` false, ``hi`` true, adjacent). The answer does not depend on est.
    """
    HIGH = _high(KIND)
    LOW = -1 - HIGH
    pm = pm & (c - 1 >= LOW)
    pp = pp | (c + 1 > HIGH)
    settled_at = (pc & ~pm) | ~active
    settled_up = ~pc & pp & active
    down = pc & pm & active  # hi = c - 1 is true: gallop down
    hi = tl.where(pc, tl.where(settled_at, c, c - 1), tl.where(settled_up, c + 1, HIGH + 1))
    lo = tl.where(settled_at | settled_up | down, hi - 1, c + 1)  # up: c + 1 is false
    lo = tl.where(down, LOW - 1, lo)
    todo = down | (~pc & ~pp & active)
    pe = _pred(est, d, target, STRICT, KIND)
    hi = tl.where(todo, tl.where(pe, est, HIGH + 1), hi)
    lo = tl.where(todo, tl.where(pe, LOW - 1, est), lo)
    down = pe
    step = tl.full(c.shape, 1, tl.int64)
    while tl.max(todo.to(tl.int32), axis=0) > 0:
        probe = tl.where(down, hi - step, lo + step)
        out = tl.where(down, probe < LOW, probe > HIGH)
        pv = _pred(tl.minimum(tl.maximum(probe, LOW), HIGH), d, target, STRICT, KIND) & ~out
        set_hi = todo & tl.where(down, ~out & pv, out | pv)
        set_lo = todo & tl.where(down, out | ~pv, ~out & ~pv)
        hi = tl.where(set_hi, tl.where(out, HIGH + 1, probe), hi)
        lo = tl.where(set_lo, tl.where(out, LOW - 1, probe), lo)
        todo = todo & ~out & tl.where(down, pv, ~pv)
        step = tl.where(todo, step * 2, step)
    gap = (hi - lo > 1) & active
    while tl.max(gap.to(tl.int32), axis=0) > 0:
        mid = lo + (hi - lo) // 2
        pv = _pred(mid, d, target, STRICT, KIND)
        hi = tl.where(gap & pv, mid, hi)
        lo = tl.where(gap & ~pv, mid, lo)
        gap = (hi - lo > 1) & active
    return hi


@triton.jit
def _estimate(m, side: tl.constexpr, d, KIND: tl.constexpr):
    """The ordinal nearest (midpoint between m and its neighbour on ``side``) - d, in fp64: where w + d
    crosses into rounding to m, so a run's end is a step or two away (as ``_codec._estimate``)."""
    HIGH = _high(KIND)
    LOW = -1 - HIGH
    nb = _from_ord(_ord(m, KIND) + side, KIND)
    mid = (_to_f32(m, KIND).to(tl.float64) + _to_f32(nb, KIND).to(tl.float64)) * 0.5
    e = _ord(_round((mid - d.to(tl.float64)).to(tl.float32), KIND), KIND)
    return tl.minimum(tl.maximum(e, LOW), HIGH)


@triton.jit
def _runs(m, g, d, active, KIND: tl.constexpr):
    """The run [first, first + count) of originals that merge to m under d (``_codec.candidates``)."""
    HIGH = _high(KIND)
    LOW = -1 - HIGH
    target = _ord(m, KIND)
    c = tl.minimum(tl.maximum(_ord(g, KIND), LOW), HIGH)
    fm = _f(tl.maximum(c - 1, LOW), d, KIND)
    f0 = _f(c, d, KIND)
    fp = _f(tl.minimum(c + 1, HIGH), d, KIND)
    first = _first_true(f0 >= target, fm >= target, fp >= target, c, _estimate(m, -1, d, KIND), d, target,
                        active, False, KIND)
    end = _first_true(f0 > target, fm > target, fp > target, c, _estimate(m, 1, d, KIND), d, target,
                      active, True, KIND)
    return first, tl.maximum(end - first, 0)


@triton.jit
def _width(count):
    """ceil(log2 count) (0 for count <= 1), int32, from the exponent of count - 1 as an fp64."""
    x = tl.maximum(count - 1, 0).to(tl.float64)
    e = ((x.to(tl.int64, bitcast=True) >> 52) - 1022).to(tl.int32)
    return tl.where(count > 1, e, 0)


@triton.jit
def codec_kernel(W, A, B, scale, rows, cols, R, stride_ar, stride_ac, stride_br, stride_bc,
                 tiles, tile_off, status, buf, cap_bits, esc_idx, esc_bits, esc_cap, ctr, tiles_n,
                 KIND: tl.constexpr, UNMERGE: tl.constexpr, EXACT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Merge or unmerge one tile with its codes decided in registers.

    merge: writes W' and, for each element, ``ordinal(w) - first`` of its candidate run in
    ``ceil(log2 count)`` bits at the tile's bit offset (reserved with one atomic add on ``ctr[0]``,
    stored in ``tile_off``), OR-ed into ``buf``; originals outside their run (non-finite weights) go
    to the escape list (``ctr[1]`` counts). A tile that finds ``buf`` or the list full writes nothing
    and records its needs in ``status`` so the host can rerun it. ``ctr[2]``: elements with a code,
    ``ctr[3]``: merged values that overflowed, ``ctr[4]``: pending tiles.
    unmerge: recomputes the same runs from W' and d and writes ``first + code`` (escapes: the host).
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
        first, count = _runs(m, g, d, inside, KIND)
        width = tl.where(inside, _width(count), 0)
        need = tl.sum(width, axis=0)
        pos = tl.cumsum(width, axis=0) - width  # the element's first bit within the tile
        if UNMERGE:
            bit = tl.load(tile_off + tile) + pos
            word = bit >> 5
            shift = (bit & 31).to(tl.int64)
            has = width > 0
            lo_w = tl.load(buf + word, mask=has, other=0).to(tl.int64) & 0xFFFFFFFF
            hi_w = tl.load(buf + word + 1, mask=has & (shift + width > 32), other=0).to(tl.int64) & 0xFFFFFFFF
            code = ((lo_w | (hi_w << 32)) >> shift) & ((tl.full(shift.shape, 1, tl.int64) << width) - 1)
            out = _from_ord(first + code, KIND)
        else:
            index = _ord(w, KIND) - first
            fits = (index >= 0) & (index < count)
            escape = inside & ~fits
            n_esc = tl.sum(escape.to(tl.int32), axis=0)
            base = tl.atomic_add(ctr, need.to(tl.int64))
            ebase = tl.atomic_add(ctr + 1, n_esc.to(tl.int64))
            tl.store(tile_off + tile, base)
            out = m
            if (base + need <= cap_bits) & (ebase + n_esc <= esc_cap):
                bit = base + pos
                word = bit >> 5
                shift = (bit & 31).to(tl.int64)
                has = width > 0
                v = tl.where(fits, index, 0) << shift
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
                tl.atomic_add(ctr + 2, tl.sum((inside & (count > 1)).to(tl.int64), axis=0))
            else:
                tl.store(status + 2 * pid, need + 1)
                tl.store(status + 2 * pid + 1, n_esc)
                tl.atomic_add(ctr + 4, 1)
                inside = inside & (pid < 0)  # write nothing: the host reruns this tile
    if KIND == _FP32:
        tl.store(W + flat, out, mask=inside)
    else:
        tl.store(W + flat, out.to(tl.int16), mask=inside)
