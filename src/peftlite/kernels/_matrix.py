"""A weight as a row-major (out, fan_in) matrix that is a true view of its storage.

An in-place update must go through a view: ``reshape`` (or einops' ``rearrange``) of a channels_last
conv weight copies, and the update would be silently lost. So the weight is only ever viewed
(``permute`` + ``view``), its columns in memory order, and A's columns are permuted to match instead
(A is small; a copy of it is fine).
"""

from __future__ import annotations

from collections.abc import Callable

from einops import rearrange
from torch import Tensor


def as_matrix(weight: Tensor, A: Tensor, B: Tensor, gain: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(W2, A2, B2)`` with ``W2`` a contiguous view of ``weight`` and ``W2 + B2 @ A2`` its update.

    Args:
        weight: (out, ...) in contiguous or channels_last layout, or a transposed 2-D weight.
        A: (r, fan_in) in the weight's logical column order. B: (out, r).
        gain: the (out,) per-output-row gain to be merged (DoRA), if any; only checked here: ``W2``'s rows
            must be the output rows, which a transposed weight's are not.
    Raises:
        ValueError: the weight's layout has no matrix view (it would need a copy), or it is transposed and
            a gain is given.
    """
    out = weight.shape[0]
    if weight.is_contiguous():
        return weight.view(out, -1), A, B
    if weight.dim() == 4 and weight.permute(0, 2, 3, 1).is_contiguous():  # channels_last
        _, c, kh, kw = weight.shape
        a = rearrange(A, "r (c kh kw) -> r (kh kw c)", c=c, kh=kh, kw=kw)  # columns in NHWC memory order
        return weight.permute(0, 2, 3, 1).view(out, -1), a, B
    if weight.dim() == 2 and weight.t().is_contiguous():  # W = Vᵀ with V contiguous: V += Aᵀ Bᵀ
        if gain is not None:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} with strides {weight.stride()} is stored transposed, so "
                "its matrix view's rows are its inputs and a per-output-row gain cannot be merged in place; make "
                "it contiguous (weight.data = weight.data.contiguous()) before merging"
            )
        return weight.t(), B.t(), A.t()
    raise ValueError(
        f"weight of shape {tuple(weight.shape)} with strides {weight.stride()} has no in-place matrix view; "
        "make it contiguous (weight.data = weight.data.contiguous()) before merging"
    )


def as_matrix_rows(weight: Tensor, rows: Callable[[bool], Callable]) -> tuple[Tensor, Callable]:
    """``(W2, rows2)``: the in-place matrix view of ``weight`` (as ``as_matrix``) and ΔW's rows in its order.

    ``rows(transposed)`` builds the ΔW row function (``_torch.Rows``) of the logical (out, fan_in) matrix, or
    of its transpose: a transposed 2-D weight's matrix view is Wᵀ. A channels_last conv's columns are
    permuted per block to NHWC memory order.
    """
    out = weight.shape[0]
    if weight.is_contiguous():
        return weight.view(out, -1), rows(False)
    if weight.dim() == 4 and weight.permute(0, 2, 3, 1).is_contiguous():
        _, c, kh, kw = weight.shape
        logical = rows(False)
        return weight.permute(0, 2, 3, 1).view(out, -1), \
            lambda start, stop: rearrange(logical(start, stop), "r (c kh kw) -> r (kh kw c)", c=c, kh=kh, kw=kw)
    if weight.dim() == 2 and weight.t().is_contiguous():
        return weight.t(), rows(True)
    raise ValueError(
        f"weight of shape {tuple(weight.shape)} with strides {weight.stride()} has no in-place matrix view; "
        "make it contiguous (weight.data = weight.data.contiguous()) before merging"
    )
