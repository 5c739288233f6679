"""Per-row gain (DoRA): merge ``W'_ij = round(g_i·(W_ij + d_ij))``, and what exact unmerge needs for it.

The merged value is ``round(fp32(fp32(w + d)·g))`` (``_bits.merged_value`` with a gain): the sum and the
product each rounded to fp32, then one rounding to W's dtype. For ``g > 0`` it is monotone in ``w``, so
the originals that merge to ``W'`` are still one run of ordinals and the candidate-index codec applies
with this merged-value function. For ``g < 0`` the sign is folded: ``round(-x) = -round(x)``, so
``f_g(w) = -f_{|g|}(w)`` and the run for ``W'`` under ``g`` is the run for ``-W'`` under ``|g|``
(``fold_sign``, used by ``_codec.candidates``). A row with ``g == 0`` keeps nothing of W: the backend
keeps it verbatim in the record.

The 16-bit binade flag (``_bits.may_lose``) assumes ``round(w + d)``: a gain makes runs of two common
anywhere in a binade, so gain merges use the exact flag (``exact_flag``) for every dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bits import Format, bits, from_ordinal, merged_value, ordinal
from ._record import NonFiniteMergeError


def check_gain(weight: Tensor, gain: Tensor) -> None:
    """Refuse a gain that does not fit the (rows, cols) matrix ``weight``, before anything is written.

    Raises:
        ValueError: not a (rows,) float32 tensor on the weight's device.
        NonFiniteMergeError: a non-finite gain.
    """
    rows = weight.shape[0]
    shape = tuple(gain.shape) if isinstance(gain, Tensor) else type(gain).__name__
    if not isinstance(gain, Tensor) or gain.shape != (rows,):
        raise ValueError(
            f"gain of shape {shape} does not fit the weight matrix of shape {tuple(weight.shape)}: it needs one "
            f"value per output row, shape ({rows},). A transposed 2-D weight (stored as Vᵀ) has its inputs as "
            "matrix rows: make it contiguous (weight.data = weight.data.contiguous()) before merging"
        )
    if gain.dtype != torch.float32:
        raise ValueError(f"gain is {gain.dtype}, but the merge is defined with a float32 gain; pass gain.float()")
    if gain.device != weight.device:
        raise ValueError(f"gain is on {gain.device}, the weight on {weight.device}; pass gain.to(weight.device)")
    finite = torch.isfinite(gain)
    if not bool(finite.all()):
        bad = (~finite).nonzero().view(-1)
        i = int(bad[0])
        raise NonFiniteMergeError(
            f"gain[{i}] = {gain[i].item()!r} is not finite ({bad.numel()} of {rows} rows); the weight is "
            "unchanged. A DoRA magnitude must be finite: reload a good adapter or lower the learning rate"
        )


def exact_flag(guess: Tensor, merged: Tensor, d: Tensor, g: Tensor, fmt: Format) -> Tensor:
    """Where the original may not be ``guess`` under ``w -> round(g·(w + d))``, tested exactly.  Flat bool.

    Unflagged: the guess merges to ``W'`` and neither of its ordinal neighbours does (-0.0 is +0.0's lower
    neighbour, as in the codec), so, the map being monotone, the guess is the only candidate. Guesses at
    either end of the finite range, or beyond it, are flagged, and their run comes from the codec.

    Args:
        guess, merged: (n,) in the weight's dtype. d, g: (n,) fp32, g nonzero.
    """
    low, high = -1 - fmt.max_finite, fmt.max_finite
    o = ordinal(bits(guess).view(-1), fmt)
    m = bits(merged).view(-1)
    at = o.clamp(low + 1, high - 1)  # = o wherever the flag depends on the evaluations

    def hits(x: Tensor) -> Tensor:
        return bits(merged_value(from_ordinal(x, fmt), d, g)) == m

    return (o <= low) | (o >= high) | ~hits(at) | hits(at - 1) | hits(at + 1)


def fold_sign(merged: Tensor, g: Tensor, fmt: Format) -> tuple[Tensor, Tensor]:
    """``(-W', -g)`` where ``g < 0``, else ``(W', g)``: the same run of originals under a positive gain.

    The sign is flipped on the bit pattern, so signed zeros fold exactly.  (n,) each.
    """
    sign = torch.where(g < 0, -(1 << (fmt.bits - 1)), 0).to(fmt.int_dtype)
    return (bits(merged) ^ sign).view(fmt.dtype), g.abs()
