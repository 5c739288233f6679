"""Which kernels merge a given weight: chosen by detection, overridable with ``PEFTLITE_KERNELS``.

Detection (once per process): CUDA weights use Triton when it imports; everything else uses torch.
``PEFTLITE_KERNELS=torch`` forces torch; ``PEFTLITE_KERNELS=triton`` forces Triton, which on CPU tensors
needs the Triton interpreter (``TRITON_INTERPRET=1``, as CI runs it). A request that cannot be honoured
falls back to torch with a warning; the detected choice is logged at debug level.
"""

from __future__ import annotations

import functools
import logging
import os

from torch import Tensor

log = logging.getLogger("peftlite.kernels")
CHOICES = ("torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_module():
    """The Triton host module, or None when Triton cannot be imported (logged once)."""
    try:
        from . import _triton
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        log.debug("peftlite kernels: Triton unavailable (%s: %s); merges use torch", type(e).__name__, e)
        return None
    return _triton


@functools.lru_cache(maxsize=8)
def _requested(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if value not in CHOICES:
        raise ValueError(f"PEFTLITE_KERNELS={value!r} is not a backend; use one of {', '.join(CHOICES)}, "
                         "or unset it for detection")
    return value


def backend_for(weight: Tensor) -> str:
    """The backend that merges ``weight``: "triton" or "torch"."""
    want = _requested(os.environ.get("PEFTLITE_KERNELS"))
    if want == "torch":
        return "torch"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    usable = weight.is_cuda or (interpret and weight.device.type == "cpu")
    if want == "triton":
        tri = triton_module()
        if tri is None or not usable or not tri.supports(weight):
            log.warning("PEFTLITE_KERNELS=triton, but Triton %s for a %s %s weight; using torch",
                        "is not importable" if tri is None else "cannot run", weight.device, weight.dtype)
            return "torch"
        return "triton"
    if weight.is_cuda:
        tri = triton_module()
        if tri is not None and tri.supports(weight):
            return "triton"
        log.debug("peftlite kernels: %s weight on %s merged with torch", weight.dtype, weight.device)
    return "torch"
