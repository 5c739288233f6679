"""Merge and unmerge kernels: fold ``scale·ΔW`` into a weight in place, and take it out bit-exactly.

The backend is chosen once per call by detection (CUDA tensors with Triton importable -> ``triton``;
everything else -> ``torch``) and can be forced with the environment variable ``PEFTLITE_KERNELS``.
Each merge returns a ``MergeRecord`` that names its backend; unmerge uses that same backend, since the
exact restore depends on recomputing ΔW in the same fp32 order.
"""

from __future__ import annotations

from ._matrix import as_matrix
from ._record import MergeRecord, NonFiniteMergeError
from ._torch import merge_, unmerge_

__all__ = ["MergeRecord", "NonFiniteMergeError", "as_matrix", "merge_", "unmerge_"]
