"""Merge and unmerge kernels: fold ``scale·ΔW`` into a weight in place, and take it out bit-exactly.

The backend is chosen per weight by detection (CUDA tensors with Triton importable -> ``triton``;
everything else -> ``torch``) and can be forced with the environment variable ``PEFTLITE_KERNELS``
(see ``_backend``). Each merge returns a ``MergeRecord`` that names its backend; unmerge uses that same
backend, since the exact restore depends on recomputing ΔW in the same fp32 order. The scheme is in
docs/exact-unmerge.md. Merges with a per-row gain (DoRA) run on the torch backend on every device.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from . import _torch
from ._backend import backend_for, triton_module
from ._matrix import as_matrix, as_matrix_rows
from ._record import MergeRecord, NonFiniteMergeError
from ._torch import Rows, kron_rows, pair_rows, summed_rows

__all__ = ["MergeRecord", "NonFiniteMergeError", "Rows", "as_matrix", "as_matrix_rows", "backend_for", "exact_product",
           "kron_rows", "merge_", "merge_rows_", "pair_rows", "summed_rows", "unmerge_", "unmerge_rows_"]
log = logging.getLogger("peftlite.kernels")


def _module(name: str):
    return triton_module() if name == "triton" else _torch


def merge_(weight: Tensor, A: Tensor, B: Tensor, scale: float, gain: Tensor | None = None) -> MergeRecord:
    """Fold ``scale·B@A`` into the (rows, cols) matrix view ``weight`` in place (see ``as_matrix``).

    Args:
        gain: (rows,) float32 on the weight's device: one gain per output row (DoRA), merging
            ``W'_ij = round(g_i·(W_ij + ΔW_ij))``. The matrix rows must be the output rows: get the view
            from ``as_matrix(weight, A, B, gain=gain)``, which refuses a transposed weight. The record keeps
            the gains, and rows with gain 0 verbatim (``record.raw_rows``). Gain merges run on the torch
            backend (the Triton kernels do not take a gain).
    Raises:
        NonFiniteMergeError: non-finite adapter, gain or merged values; ``weight`` is bit-identical to before.
        ValueError: a gain of the wrong shape, dtype or device.
    """
    name = backend_for(weight)
    if gain is None:
        return _module(name).merge_(weight, A, B, scale)
    if name != "torch":
        log.debug("peftlite kernels: a merge with a gain runs on the torch backend, not %s", name)
    return _torch.merge_(weight, A, B, scale, gain=gain)


def unmerge_(weight: Tensor, A: Tensor, B: Tensor, scale: float, record: MergeRecord | None) -> None:
    """Take ``scale·B@A`` back out of ``weight``: bit-exact with the merge's record, by its backend.

    The record names the backend that merged, and that backend unmerges: exact unmerge recomputes ΔW
    in the merge's order. A gain merge's record holds its gains, so no gain is passed here.

    Raises:
        RuntimeError: the record's backend is unavailable here, or the weight moved device or dtype.
    """
    name = record.backend if record is not None else backend_for(weight)
    module = _module(name)
    if module is None:
        raise RuntimeError(f"unmerge: the weight was merged by the {name!r} kernels, which cannot run here "
                           "(Triton is not importable); unmerge where it merged, before moving the model")
    if record is not None:
        record.check_matches(weight, "unmerge")
        if name == "triton" and not (weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError(f"unmerge: merged by the triton kernels on {record.device}, but the weight is "
                               f"now on {weight.device}; move the model back to unmerge exactly")
    module.unmerge_(weight, A, B, scale, record)


def exact_product(factor: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A factor given whole, or as ``(B, A)`` formed as ``B @ A`` in ``_torch.delta``'s fixed order (a matmul
    library's order may change with the thread count); in fp32 (fp64 for fp64 factors), detached."""
    if isinstance(factor, Tensor):
        return factor.detach().to(torch.promote_types(factor.dtype, torch.float32))
    B, A = factor
    A, B = _torch._in_delta_dtype(A.detach(), B.detach())
    return _torch.delta(A, B, 1.0)


def merge_rows_(weight: Tensor, rows: Rows) -> MergeRecord:
    """``merge_`` with ΔW's rows from a deterministic function (``kron_rows``, ``pair_rows``, ``summed_rows``)
    instead of a pair: for kinds whose ΔW is no narrow pair (LoKr). Runs on the torch backend on every
    device (its fused C pass on CPU); ``unmerge_rows_`` takes it back out bit-exactly with the same rows."""
    return _torch.merge_(weight, None, None, 0.0, rows=rows)


def unmerge_rows_(weight: Tensor, rows: Rows, record: MergeRecord | None) -> None:
    """Take ``merge_rows_``'s ΔW back out of ``weight``: bit-exact with its record."""
    if record is not None:
        record.check_matches(weight, "unmerge")
    _torch.unmerge_(weight, None, None, 0.0, record, rows=rows)
