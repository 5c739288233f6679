"""DoRA's per-row factor for a layer's forward: ``g = m / ‖W + s·ΔW‖``, the norm detached.

The DoRA paper (§4.3) treats ``‖W + s·ΔW‖`` as a constant in backward: the magnitude gets its gradient
through ``g``, A and B get theirs through ``W + s·ΔW`` only. That saves keeping the norm's graph (a
W-sized one) and matches the paper's and PEFT's results; we do the same. The norm comes from
``functional.dora_norms`` (no W-sized temporary), and is reused while W, A, B and the scale are the
same tensors, unchanged since (``_version``): small-batch inference does not pay its ``out·in·r``
product on every call. Under ``torch.compile`` it is computed in the graph every call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional


def _key(weight: Tensor, A: Tensor, B: Tensor, scale) -> tuple:
    return tuple((id(t), t._version, t.data_ptr()) for t in (weight, A, B)) + (float(scale),)


def gain(weight: Tensor, A: Tensor, B: Tensor, scale, pair: nn.Module) -> Tensor:
    """``m / ‖W + scale·B A‖`` per output row (0 where the norm is 0), differentiable in m only.  -> (out,)"""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            norms = functional.dora_norms(weight, A, B, scale)
    else:
        key = _key(weight, A, B, scale)
        cached = pair.__dict__.get("_norm_cache")
        if cached is not None and cached[0] == key:
            norms = cached[1]
        else:
            with torch.no_grad():
                norms = functional.dora_norms(weight, A, B, scale)
            pair.__dict__["_norm_cache"] = (key, norms)
    return functional.dora_gain(pair.magnitude, norms.to(pair.magnitude.dtype))
