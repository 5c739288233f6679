"""Candidate-index codes: what exact unmerge needs where merging lost bits, in ``ceil(log2 k)`` bits.

For a flagged element (see ``_bits.may_lose``), unmerge knows the merged value ``W'`` and the delta
``d`` (recomputed bit-identically), so it can list the candidate originals itself: the values ``w`` of
the weight's dtype with ``round(w + d) == W'``. Rounding is monotone, so they form one run of
consecutive ordinals ``[lo, lo + k)``; it is found by galloping then bisecting from the guess. Merge
stores only ``ordinal(w) - lo``, in ``ceil(log2 k)`` bits (nothing when ``k == 1``), packed
back-to-back in 32-bit words in element order. Both directions call ``candidates`` on the same inputs,
so they agree on every ``k``. An original outside its run (which the scheme says cannot happen) is
kept verbatim as an escape instead of being encoded. With a per-row gain (DoRA, ``_gain``) the merged
value is ``round(g·(w + d))`` and the same search runs on it, the sign of a negative gain folded first.

All functions take 1-D tensors of the flagged elements, in element order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bits import Format, bits, from_ordinal, merged_value, ordinal
from ._gain import fold_sign


def _first_true(pred, start: Tensor, low: int, high: int) -> Tensor:
    """Per element, the smallest ordinal ``o`` in ``[low, high + 1]`` with ``pred(o, idx)`` true.

    ``pred`` is monotone (false then true) and treated as true at ``high + 1``. ``start`` is usually
    the answer or next to it, so two evaluations settle most elements; the rest gallop and bisect.
    """
    idx = torch.arange(start.numel(), device=start.device)
    at = pred(start, idx)
    side = torch.where(at, start - 1, start + 1).clamp(low, high)
    there = pred(side, idx)
    answer = torch.where(at, start, side)
    settled = torch.where(at, ~there | (start == low), there)
    rest = (~settled).nonzero().view(-1)
    if rest.numel():
        answer[rest] = _gallop(lambda o, i: pred(o, rest[i]), start[rest], low, high)
    return answer


def _gallop(pred, start: Tensor, low: int, high: int) -> Tensor:
    """``_first_true`` for any distance: gallop from ``start``, then bisect; converged elements drop out."""
    n = start.numel()
    idx = torch.arange(n, device=start.device)
    at = pred(start, idx)
    # hi: a known-true ordinal; lo: a known-false one (low - 1 acts as false)
    hi = torch.where(at, start, torch.full_like(start, high + 1))
    lo = torch.where(at, torch.full_like(start, low - 1), start)
    # gallop: double the step away from start until the bracket closes on the far side
    step = torch.ones_like(start)
    todo = idx
    going_down = at.clone()
    while todo.numel():
        s, dn = start[todo], going_down[todo]
        probe = torch.where(dn, s - step[todo], s + step[todo])
        inside = torch.where(dn, probe >= low, probe <= high)
        edge = torch.where(dn, torch.full_like(probe, low - 1), torch.full_like(probe, high + 1))
        probe = torch.where(inside, probe, edge)
        val = torch.zeros_like(inside)
        if inside.any():
            val[inside] = pred(probe[inside], todo[inside])
        # going down: a true probe moves hi down and continues; a false one (or the edge) fixes lo
        new_hi = dn & inside & val
        new_lo_dn = dn & ~(inside & val)
        new_lo_up = ~dn & inside & ~val
        new_hi_up = ~dn & ~(inside & ~val)
        hi[todo] = torch.where(new_hi | new_hi_up, probe, hi[todo])
        lo[todo] = torch.where(new_lo_dn | new_lo_up, probe, lo[todo])
        step[todo] = step[todo] * 2
        keep = (new_hi | new_lo_up) & inside
        todo = todo[keep]
    # bisect between lo (false) and hi (true)
    todo = idx[hi - lo > 1]
    while todo.numel():
        mid = lo[todo] + (hi[todo] - lo[todo]) // 2
        val = pred(mid, todo)
        hi[todo] = torch.where(val, mid, hi[todo])
        lo[todo] = torch.where(val, lo[todo], mid)
        todo = todo[hi[todo] - lo[todo] > 1]
    return hi


def _estimate(bound: Tensor, d: Tensor, fmt: Format, low: int, high: int, g: Tensor | None) -> Tensor:
    """The ordinal nearest ``bound - d`` (``bound/g - d`` with a gain; in fp64): a step or two from a run's end."""
    est = ((bound if g is None else bound / g.double()) - d.double()).to(torch.float32).to(fmt.dtype)
    return ordinal(bits(est), fmt).clamp(low, high)


def candidates(merged: Tensor, d: Tensor, fmt: Format, gain: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The run of originals that merge to ``merged`` under ``d``: (first ordinal, count), both int64.

    The run's ends are where ``w + d`` (``g·(w + d)`` with a gain) crosses the midpoints between
    ``merged`` and its neighbours; the search starts from there, so it takes a few steps whatever the
    run's length. A negative gain is folded into the sign of ``merged`` (``_gain.fold_sign``), so the
    merged-value function searched is always increasing.

    Args:
        merged: (n,) merged values, in the weight's dtype. d: (n,) fp32 deltas. gain: (n,) nonzero fp32
            gains (DoRA), or None for ``round(w + d)``.
    """
    if gain is not None:
        merged, gain = fold_sign(merged, gain, fmt)
    target = ordinal(bits(merged), fmt)
    low, high = -1 - fmt.max_finite, fmt.max_finite

    def f(o: Tensor, i: Tensor) -> Tensor:
        return ordinal(bits(merged_value(from_ordinal(o, fmt), d[i], None if gain is None else gain[i])), fmt)

    def at_least(o: Tensor, i: Tensor) -> Tensor:
        return f(o, i) >= target[i]

    def above(o: Tensor, i: Tensor) -> Tensor:
        return f(o, i) > target[i]

    inf = torch.full_like(merged, float("inf"))
    m = merged.double()
    below_mid = (m + torch.nextafter(merged, -inf).double()) / 2  # where w + d starts rounding to merged
    above_mid = (m + torch.nextafter(merged, inf).double()) / 2
    first = _first_true(at_least, _estimate(below_mid, d, fmt, low, high, gain), low, high)
    end = _first_true(above, _estimate(above_mid, d, fmt, low, high, gain), low, high)
    return first, (end - first).clamp(min=0)


def widths(count: Tensor) -> Tensor:
    """``ceil(log2 count)`` per element (0 for a count of 0 or 1), as int64."""
    return torch.frexp((count - 1).clamp(min=0).double()).exponent.to(torch.int64)


def pack(values: Tensor, width: Tensor) -> Tensor:
    """Pack ``values[i]`` (< 2**width[i], width ≤ 32) back-to-back into int32 words, element order."""
    offset = torch.cumsum(width, 0) - width
    total = int(offset[-1] + width[-1]) if width.numel() else 0
    n_words = (total + 31) // 32
    if n_words == 0:
        return torch.zeros(0, dtype=torch.int32, device=values.device)
    # one spare word: zero-width codes at the very end point one past the last word
    words = torch.zeros(n_words + 1, dtype=torch.int64, device=values.device)
    word, shift = offset // 32, offset % 32
    low_bits = torch.clamp(32 - shift, max=32)
    low = (values & ((1 << low_bits) - 1)) << shift
    words.scatter_add_(0, word, low)
    spill = width > low_bits
    if spill.any():
        words.scatter_add_(0, word[spill] + 1, values[spill] >> low_bits[spill])
    words = words[:n_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: Tensor, width: Tensor) -> Tensor:
    """Inverse of ``pack``: the int64 values, given the same widths."""
    if width.numel() == 0 or words.numel() == 0:
        return torch.zeros_like(width)
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    w64 = torch.cat([w64, w64.new_zeros(2)])  # zero-width codes may point one past the end
    offset = torch.cumsum(width, 0) - width
    word, shift = offset // 32, offset % 32
    both = w64[word] | (w64[word + 1] << 32)  # the 64 bits starting at the word holding the code
    return (both >> shift) & ((1 << width) - 1)


def encode(orig: Tensor, merged: Tensor, d: Tensor, fmt: Format,
           gain: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Codes for flagged elements: (int32 words, bool mask of originals that must be escapes)."""
    first, count = candidates(merged, d, fmt, gain)
    index = ordinal(bits(orig), fmt) - first
    escape = (index < 0) | (index >= count)
    return pack(torch.where(escape, 0, index), widths(count)), escape


def decode(words: Tensor, merged: Tensor, d: Tensor, fmt: Format, gain: Tensor | None = None) -> Tensor:
    """The originals of flagged elements from their codes (escapes come out wrong; the caller fixes them)."""
    first, count = candidates(merged, d, fmt, gain)
    return from_ordinal(first + unpack(words, widths(count)), fmt)
