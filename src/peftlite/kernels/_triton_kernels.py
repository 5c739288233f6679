"""The Triton merge/unmerge kernel: one pass over W, exact rounding in integer bit operations.

Each program takes one (BM, BN) tile of the (rows, cols) weight matrix. It computes the tile of
``d = scale·(B @ A)`` in fp32 registers (``tl.dot`` with ``input_precision="ieee"``, in the same order
for merge and unmerge), and then:

    merge     W' = round(w + d)   (rounded to nearest-even with integer ops: the Triton interpreter
                                   truncates fp32 -> bf16 casts, and CI runs the interpreter)
              guess = round(W' - d); flag = may_lose(guess, W', d) as in ``_bits``; writes W'
    unmerge   guess = round(W' - d); writes the guess where unflagged, leaves flagged W' in place

and appends the elements the host must finish (flagged ones, and unflagged ones whose guess is wrong)
to a scratch list: (flat index, original bits, d). Each tile reserves its slots with one atomic add;
a tile that finds the list full writes nothing and marks itself pending, and the host runs it again
with a larger list. Overflowing merged values are counted, never silently written as valid.
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


@triton.jit
def _next_after(b, up: tl.constexpr):
    """fp32 bits of nextafter(x, ±inf), as torch.nextafter computes it."""
    zero = (b & 0x7FFFFFFF) == 0
    inf = (b & 0x7FFFFFFF) == 0x7F800000
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    if up:
        step = tl.where(b >= 0, b + 1, b - 1)
        out = tl.where(zero, 1, step)
        out = tl.where(inf & (b >= 0), b, out)
    else:
        step = tl.where(b >= 0, b - 1, b + 1)
        out = tl.where(zero, -2147483647, step)  # 0x80000001: -min subnormal
        out = tl.where(inf & (b < 0), b, out)
    return tl.where(nan, b, out)


@triton.jit
def _may_lose(g, m, d, KIND: tl.constexpr):
    """``_bits.may_lose`` on bits: where the original may not be the guess."""
    if KIND == _FP32:
        flag = _merged(g, d, KIND) != m
        flag = flag | (_merged(_next_after(g, True), d, KIND) == m)
        flag = flag | (_merged(_next_after(g, False), d, KIND) == m)
        return flag
    else:
        if KIND == _BF16:
            MM = 0x7F
        else:
            MM = 0x3FF
        mag_g = g & 0x7FFF
        mag_m = m & 0x7FFF
        mant = mag_g & MM
        return (mag_m > (mag_g | MM)) | (mant == 0) | (mant == MM)


@triton.jit
def merge_kernel(W, A, B, scale, rows, cols, R, stride_ar, stride_ac, stride_br, stride_bc,
                 tiles, status, scr_idx, scr_orig, scr_d, counter, capacity, bad, tiles_n,
                 KIND: tl.constexpr, UNMERGE: tl.constexpr, EXACT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    tile = tl.load(tiles + tl.program_id(0))
    tm = tile // tiles_n
    tn = tile % tiles_n
    rm = tm * BM + tl.arange(0, BM)
    rn = tn * BN + tl.arange(0, BN)
    inside = (rm[:, None] < rows) & (rn[None, :] < cols)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, R, BR):
        rk = k0 + tl.arange(0, BR)
        b = tl.load(B + rm[:, None] * stride_br + rk[None, :] * stride_bc,
                    mask=(rm[:, None] < rows) & (rk[None, :] < R), other=0.0)
        a = tl.load(A + rk[:, None] * stride_ar + rn[None, :] * stride_ac,
                    mask=(rk[:, None] < R) & (rn[None, :] < cols), other=0.0)
        acc += tl.dot(b, a, input_precision="ieee")
    d = acc * scale
    flat = rm[:, None].to(tl.int64) * cols + rn[None, :]
    if KIND == _FP32:
        w = tl.load(W + flat, mask=inside, other=0)
    else:
        w = tl.load(W + flat, mask=inside, other=0).to(tl.int32) & 0xFFFF
    if UNMERGE:
        m = w
    else:
        m = _merged(w, d, KIND)
    g = _round(_to_f32(m, KIND) - d, KIND)
    if KIND == _FP32:
        EXP = 0x7F800000
    elif KIND == _BF16:
        EXP = 0x7F80
    else:
        EXP = 0x7C00
    if not UNMERGE:
        overflow = inside & ((m & EXP) == EXP) & ((w & EXP) != EXP)
        n_bad = tl.sum(overflow.to(tl.int32), axis=1)
        n_bad = tl.sum(n_bad, axis=0)
        if n_bad > 0:
            tl.atomic_add(bad, n_bad)
    if EXACT:
        flag = _may_lose(g, m, d, KIND) & inside
        if UNMERGE:
            keep = flag
        else:
            keep = flag | (inside & (g != w))
        flat_keep = tl.reshape(keep.to(tl.int32), (BM * BN,))
        count = tl.sum(flat_keep, axis=0)
        base = tl.atomic_add(counter, count)
        if base + count <= capacity:
            pos = base + tl.cumsum(flat_keep, axis=0) - 1
            fk = flat_keep != 0
            code = tl.reshape(tl.where(flag, flat, -1 - flat), (BM * BN,))
            tl.store(scr_idx + pos, code, mask=fk)
            tl.store(scr_orig + pos, tl.reshape(w, (BM * BN,)), mask=fk)
            tl.store(scr_d + pos, tl.reshape(d, (BM * BN,)), mask=fk)
            if UNMERGE:
                out = g
                write = inside & ~flag
            else:
                out = m
                write = inside
            if KIND == _FP32:
                tl.store(W + flat, out, mask=write)
            else:
                tl.store(W + flat, out.to(tl.int16), mask=write)
        else:
            tl.store(status + tl.program_id(0), 1)
    else:
        out = g if UNMERGE else m
        if KIND == _FP32:
            tl.store(W + flat, out, mask=inside)
        else:
            tl.store(W + flat, out.to(tl.int16), mask=inside)


@triton.jit
def round_kernel(x_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """The kernel's rounding alone (fp32 -> 16-bit patterns), so tests can compare it with torch's casts."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, _round(x, KIND).to(tl.int16), mask=offs < n)
