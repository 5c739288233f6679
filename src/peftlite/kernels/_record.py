"""What a merge leaves behind so that unmerge restores W bit-exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class NonFiniteMergeError(ValueError):
    """Merging would write a non-finite weight; the weight was left (or put back) exactly as it was."""


@dataclass
class MergeRecord:
    """Exact-unmerge information for one (rows, cols) weight matrix.

    Unmerge writes ``round(W' - ΔW)`` everywhere but where the element's window (``_codec.window``) has a
    code: there the window's start plus the code from ``codes``; then it writes the ``escapes`` verbatim.
    ``chunks[i]`` is the first word of the codes of the i-th block of elements (the backend's blocking), so
    blocks decode independently.

    A merge with a per-row gain (DoRA, see ``_gain``) also keeps the gains, since unmerge needs them to
    recompute the merged-value function, and keeps verbatim the rows whose gain is zero (nothing of them
    is left in ``W'``). Its guess is ``round(W'/g - ΔW)``, and its windows are computed with the gain.
    """

    backend: str
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, int]
    codes: Tensor  # (words,) int32: window offsets by bit planes, block by block (see _codec)
    chunks: Tensor  # torch: (blocks + 1,) int64 word offsets (CPU); triton: (tiles,) int64 bit offsets (device)
    escape_index: Tensor  # (n,) int64 flat indices into the matrix
    escape_values: Tensor  # (n,) original values, in W's dtype
    flagged: int = 0  # elements with a code (width > 0; for reports)
    gain: Tensor | None = None  # (rows,) float32 per-row gains of a DoRA merge; None for a plain merge
    raw_index: Tensor | None = None  # (n,) int64 rows whose gain is 0, kept verbatim
    raw_values: Tensor | None = None  # (n, cols) their original values, in W's dtype

    @property
    def nbytes(self) -> int:
        """Bytes held while merged: codes, block offsets, escapes, and a gain merge's gains and raw rows."""
        held = (self.codes, self.chunks, self.escape_index, self.escape_values, self.gain, self.raw_index,
                self.raw_values)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    @property
    def raw_rows(self) -> int:
        """Rows kept verbatim because their gain was zero (excepted from the memory bound)."""
        return 0 if self.raw_index is None else self.raw_index.numel()

    @property
    def bits_per_element(self) -> float:
        rows, cols = self.shape
        return 8 * self.nbytes / max(1, rows * cols)

    def check_matches(self, weight: Tensor, where: str) -> None:
        """Refuse to unmerge a weight that moved device or dtype, or changed shape, since the merge."""
        if weight.dtype != self.dtype or weight.device != self.device or tuple(weight.shape) != self.shape:
            raise RuntimeError(
                f"{where}: merged as {self.dtype} {tuple(self.shape)} on {self.device}, but the weight is "
                f"now {weight.dtype} {tuple(weight.shape)} on {weight.device}; move the model back to "
                "unmerge exactly, and unmerge before .to(...) next time"
            )
