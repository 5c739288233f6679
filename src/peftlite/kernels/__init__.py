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

from torch import Tensor

from . import _torch
from ._backend import backend_for, triton_module
from ._matrix import as_matrix
from ._record import MergeRecord, NonFiniteMergeError

__all__ = ["MergeRecord", "NonFiniteMergeError", "as_matrix", "backend_for", "merge_", "unmerge_"]
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
