"""Merge and unmerge kernels: fold ``scale·ΔW`` into a weight in place, and take it out bit-exactly.

The backend is chosen per weight by detection (CUDA tensors with Triton importable -> ``triton``;
everything else -> ``torch``) and can be forced with the environment variable ``PEFTLITE_KERNELS``
(see ``_backend``). Each merge returns a ``MergeRecord`` that names its backend; unmerge uses that same
backend, since the exact restore depends on recomputing ΔW in the same fp32 order. The scheme is in
docs/exact-unmerge.md.
"""

from __future__ import annotations

import os

from torch import Tensor

from . import _torch
from ._backend import backend_for, triton_module
from ._matrix import as_matrix
from ._record import MergeRecord, NonFiniteMergeError

__all__ = ["MergeRecord", "NonFiniteMergeError", "as_matrix", "backend_for", "merge_", "unmerge_"]


def _module(name: str):
    return triton_module() if name == "triton" else _torch


def merge_(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> MergeRecord:
    """Fold ``scale·B@A`` into the (rows, cols) matrix view ``weight`` in place (see ``as_matrix``).

    Raises:
        NonFiniteMergeError: non-finite adapter or merged values; ``weight`` is bit-identical to before.
    """
    return _module(backend_for(weight)).merge_(weight, A, B, scale)


def unmerge_(weight: Tensor, A: Tensor, B: Tensor, scale: float, record: MergeRecord | None) -> None:
    """Take ``scale·B@A`` back out of ``weight``: bit-exact with the merge's record, by its backend.

    The record names the backend that merged, and that backend unmerges: exact unmerge recomputes ΔW
    in the merge's order.

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
