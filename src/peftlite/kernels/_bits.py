"""Float formats as integers: bit views, a total order on bit patterns, and the merge's roundings.

Pure tensor functions shared by every backend. ``ordinal`` maps the bit patterns of a float format
one-to-one onto integers so that larger values get larger integers (-0.0 sits just below +0.0), so
"the next representable value" is ``+1``. Everything compares bit patterns, never values, so the sign
of zero and NaN payloads are restored exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Format:
    """A float format's layout: ``bits`` wide, ``mantissa`` explicit fraction bits."""

    dtype: torch.dtype
    int_dtype: torch.dtype
    bits: int
    mantissa: int

    @property
    def magnitude_mask(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def mantissa_mask(self) -> int:
        return (1 << self.mantissa) - 1

    @property
    def max_finite(self) -> int:
        """The ordinal of the largest finite value (the ordinal of -max is ``-1 - max_finite``)."""
        return ((1 << (self.bits - 1)) - 1) - (1 << self.mantissa)  # exponent all-ones minus one


FORMATS = {
    torch.float32: Format(torch.float32, torch.int32, 32, 23),
    torch.bfloat16: Format(torch.bfloat16, torch.int16, 16, 7),
    torch.float16: Format(torch.float16, torch.int16, 16, 10),
}


def bits(x: Tensor) -> Tensor:
    """The bit patterns of ``x`` as signed integers of the same width (a view, no copy)."""
    return x.view(FORMATS[x.dtype].int_dtype)


def ordinal(b: Tensor, fmt: Format) -> Tensor:
    """Bit patterns (signed ints) -> int64 ordinals, monotone in value; -0.0 -> -1, +0.0 -> 0."""
    b = b.to(torch.int64)
    return torch.where(b >= 0, b, -1 - (b & fmt.magnitude_mask))


def from_ordinal(o: Tensor, fmt: Format) -> Tensor:
    """int64 ordinals -> values of ``fmt.dtype`` (inverse of ``ordinal``)."""
    b = torch.where(o >= 0, o, (-1 - o) - (1 << (fmt.bits - 1)))
    return b.to(fmt.int_dtype).view(fmt.dtype)


def merged_value(w: Tensor, d: Tensor, g: Tensor | None = None) -> Tensor:
    """``round(w + d)`` exactly as merge computes it: summed in fp32, rounded once to w's dtype.

    With a gain ``g`` (DoRA, broadcast against ``w``): ``round(fp32(fp32(w + d)·g))``, the sum and the
    product each rounded to fp32, then one rounding to w's dtype.
    """
    if w.dtype == torch.float32:
        return w + d if g is None else (w + d) * g
    t = w.float() + d
    return (t if g is None else t * g).to(w.dtype)


def unmerged_guess(wm: Tensor, d: Tensor, g: Tensor | None = None) -> Tensor:
    """``round(W' - d)``: the original weight wherever merging lost no bits.

    With a gain: ``round(fp32(fp32(W'/g) - d))``, right wherever the gain's rounding lost nothing.
    """
    if wm.dtype == torch.float32:
        return wm - d if g is None else wm / g - d
    v = wm.float()
    return ((v if g is None else v / g) - d).to(wm.dtype)
