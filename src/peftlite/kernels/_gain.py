"""Per-row gain (DoRA): merge ``W'_ij = round(g_i·(W_ij + d_ij))``; the check of a gain before a merge.

The merged value is ``round(fp32(fp32(w + d)·g))`` (``_bits.merged_value`` with a gain): the sum and the
product each rounded to fp32, then one rounding to W's dtype. For ``g != 0`` it is monotone in ``w``
(decreasing for ``g < 0``), so the originals that merge to ``W'`` are one run of ordinals and the window
code (``_codec.window``, which takes the gain) applies. A row with ``g == 0`` keeps nothing of W: the
backend keeps it verbatim in the record.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
