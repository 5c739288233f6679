"""What a merge leaves behind so that unmerge restores W bit-exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class NonFiniteMergeError(ValueError):
    """Merging would write a non-finite weight; the weight was left (or put back) exactly as it was."""


@dataclass
class MergeRecord:
    """Exact-unmerge information for one weight matrix.

    ``index`` holds the flat positions where ``round(W' - ΔW)`` does not give back W (W' landed in a
    coarser binade than W, so rounding lost bits), and ``values`` the original W there.
    """

    backend: str
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, int]
    index: Tensor  # (n,) int32/int64 flat indices into the (rows, cols) matrix
    values: Tensor  # (n,) original values, in W's dtype

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()

    def check_matches(self, weight: Tensor, where: str) -> None:
        """Refuse to unmerge a weight that moved device or dtype since it was merged."""
        if weight.dtype != self.dtype or weight.device != self.device or tuple(weight.shape) != self.shape:
            raise RuntimeError(
                f"{where}: merged as {self.dtype} {tuple(self.shape)} on {self.device}, but the weight is now "
                f"{weight.dtype} {tuple(weight.shape)} on {weight.device}; move the model back to unmerge "
                "exactly, and unmerge before .to(...) next time"
            )
