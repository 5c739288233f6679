"""The window code: what exact unmerge needs to undo ``W' = round(w + d)``, with no search.

Unmerge knows the merged value ``m = W'`` and the delta ``d`` (recomputed bit-identically), so it can form
the guess ``gs = round(m - d)`` (``round(m/g - d)`` with a per-row gain ``g``, DoRA) and, from
``(m, gs, d, g)`` alone, a window of ``2**width`` consecutive ordinals (bit patterns mapped monotonically onto
integers, -0.0 just below +0.0) that holds every original ``w`` with ``f(w) == m``. Merge stores
``ordinal(w) - start`` in ``width`` bits; unmerge adds it back. Both directions compute the window with the
same integer and fp32 operations, per element, with no data-dependent loop (``window``):

1. **Single.** The merged-value function ``f`` is evaluated at the guess and its two ordinal neighbours.
   If the guess merges to ``m`` and neither neighbour does, the guess is the only original (``f`` is
   monotone): width 0, nothing stored. This is exact, and it is the common case.
2. **Otherwise** the run of originals is about ``ulp(m) / (|g|·ulp(gs))`` long and centred on the guess (the
   guess is the run's centre, rounded). With ``q = max(E(m) - E(gs) - e(g), 0)`` (``E``: the biased
   exponent fields, subnormals counted as 1; ``e(g)``: the gain's unbiased exponent, 0 without a gain) the
   width is ``q + 1``: a window twice the run's estimated length. Where the neighbours' evaluations show
   the run's side, the window starts at the guess (the run starts there), ends at it, or lies beyond it
   (the guess itself does not merge to ``m``: on the side where ``f`` reaches ``m``, which a negative gain
   flips); else it is centred on it.
3. **Wide.** A guess at or beyond the ends of the finite range, a non-finite merged value, or ``q`` at least
   the mantissa's bits (the run is as wide as the guess is large, so it reaches zero and the binades below,
   where the estimate does not hold): the whole format is the window (``width = bits``, the code is the
   original's bit pattern, offset), so it is always exact.

Merge checks every element by this decode; an original outside its window (or a single guess that is not
the original) is an **escape**, kept verbatim, so exactness never depends on the estimate (only the
record's size does).

**Layout.** Codes are stored by bit planes: each row is cut into groups of ``GROUP`` columns (the last one
shorter); for a group and ``b = 0, 1, ...`` up to its widest code, bit ``b`` of every code in the group wider
than ``b`` is appended, in column order, to the block's bit stream (least significant bit first in 32-bit
words). The fused C pass appends a plane with one ``pext`` and reads it back with one ``pdep``: no loop per
coded element. ``pack`` / ``unpack`` here are the reference the C pass matches to the bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bits import Format, bits, from_ordinal, merged_value, ordinal

GROUP = 64  # columns per group of the bit-plane layout


def _exponent(b: Tensor, fmt: Format) -> Tensor:
    """The biased exponent field of bit patterns, subnormals and zeros counted as 1 (their ulp's binade)."""
    return ((b.to(torch.int64) & fmt.magnitude_mask) >> fmt.mantissa).clamp(min=1)


def _gain_exponent(gain: Tensor | None) -> Tensor | int:
    """The unbiased exponent of each gain (``|g|`` in ``[2**e, 2**(e+1))``); 0 without a gain."""
    if gain is None:
        return 0
    return ((gain.view(torch.int32).to(torch.int64) >> 23) & 0xFF) - 127


def window(merged: Tensor, guess: Tensor, d: Tensor, fmt: Format,
           gain: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each element's code width (0: the guess is the original) and window start, both int64.  1-D inputs.

    Args:
        merged, guess: (n,) in the weight's dtype. d: (n,) fp32 deltas. gain: (n,) nonzero fp32 gains, or None.
    """
    low, high = -1 - fmt.max_finite, fmt.max_finite
    t, o = ordinal(bits(merged), fmt), ordinal(bits(guess), fmt)
    interior = (o > low) & (o < high) & (t >= low) & (t <= high)
    at = o.clamp(low + 1, high - 1)

    def f(x: Tensor) -> Tensor:
        return ordinal(bits(merged_value(from_ordinal(x, fmt), d, gain)), fmt)

    f_at = f(at)
    e0, e_lo, e_hi = f_at == t, f(at - 1) == t, f(at + 1) == t
    single = interior & e0 & ~e_lo & ~e_hi
    q = (_exponent(bits(merged), fmt) - _exponent(bits(guess), fmt) - _gain_exponent(gain)).clamp(min=0)
    wide = ~interior | (q >= fmt.mantissa)  # the run reaches zero: the estimate no longer holds
    width = torch.where(wide, fmt.bits, q + 1)
    size = torch.ones_like(width) << width.clamp(max=fmt.bits - 1)  # wide windows are set below
    above = f_at < t if gain is None else (f_at < t) ^ (gain < 0)  # f decreases under a negative gain
    start = torch.where(e0 & ~e_lo, o,
                        torch.where(e0 & ~e_hi, o - size + 1,
                                    torch.where(e0, o - size // 2, torch.where(above, o + 1, o - size))))
    start = torch.where(wide, -(1 << (fmt.bits - 1)), start)
    return torch.where(single, 0, width), start


def encode(orig: Tensor, guess: Tensor, width: Tensor, start: Tensor, fmt: Format) -> tuple[Tensor, Tensor]:
    """(codes, escape): each original's offset in its window (0 where none is stored or it escapes), and where
    the original is not what ``decode`` would give (kept verbatim instead).  1-D, codes int64.

    Offsets are taken mod 2**32, as the C pass computes them in 32 bits: ``decode`` adds them back mod 2**32,
    which gives the original's ordinal whenever the offset fits the width.
    """
    offset = (ordinal(bits(orig), fmt) - start) & 0xFFFFFFFF
    coded = width > 0
    escape = torch.where(coded, offset >= (torch.ones_like(width) << width), bits(guess) != bits(orig))
    return torch.where(coded & ~escape, offset, 0), escape


def decode(guess: Tensor, width: Tensor, start: Tensor, codes: Tensor, fmt: Format) -> Tensor:
    """The originals: the guess where the width is 0, else ``start + code`` (escapes come out wrong: the caller
    writes them afterwards)."""
    o = (start + codes) & 0xFFFFFFFF
    return torch.where(width > 0, from_ordinal(torch.where(o >= 2**31, o - 2**32, o), fmt), guess)


def _plane_order(width: Tensor, cols: int) -> tuple[Tensor, Tensor]:
    """(element, bit) of every stored bit of a block's codes, in stream order.  width: (rows·cols,) flat.

    Stream order: by row, then group of ``GROUP`` columns, then bit plane, then column.
    """
    n = width.numel()
    element = torch.repeat_interleave(torch.arange(n, device=width.device), width)
    first = torch.cumsum(width, 0) - width
    bit = torch.arange(element.numel(), device=width.device) - first[element]
    row, col = element // cols, element % cols
    key = ((row * ((cols + GROUP - 1) // GROUP) + col // GROUP) * 64 + bit) * GROUP + col % GROUP
    order = torch.argsort(key)
    return element[order], bit[order]


def pack(codes: Tensor, width: Tensor, cols: int) -> Tensor:
    """A block's codes (flat, int64, ``codes < 2**width``) as its bit stream of int32 words."""
    element, bit = _plane_order(width, cols)
    stream = (codes[element] >> bit) & 1
    n_words = (stream.numel() + 31) // 32
    stream = torch.cat([stream, stream.new_zeros(n_words * 32 - stream.numel())]).view(n_words, 32)
    words = (stream << torch.arange(32, device=codes.device)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: Tensor, width: Tensor, cols: int) -> Tensor:
    """Inverse of ``pack``: the block's codes (flat int64, 0 where the width is 0), given the same widths."""
    element, bit = _plane_order(width, cols)
    stream = ((words.to(torch.int64)[:, None] >> torch.arange(32, device=words.device)) & 1).view(-1)
    codes = torch.zeros(width.numel(), dtype=torch.int64, device=width.device)
    return codes.index_add_(0, element, stream[:element.numel()] << bit)
