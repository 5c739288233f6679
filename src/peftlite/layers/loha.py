"""LoHa: ΔW = (B1 @ A1) ⊙ (B2 @ A2), applied with ``scale = alpha / r`` (rsLoRA's ``alpha / sqrt(r)`` too), as PEFT
and LyCORIS define it, r per factor pair.

``LowHadamard`` holds the four factors and reads, as ``A`` and ``B``, the rank-r² pair whose product is exactly
that ΔW (``functional.hadamard_pair``, the column-wise Khatri–Rao products). Every path that takes a LoRA pair
takes it: the layers' forwards (Linear, every Conv2d geometry, attention projections, without forming ΔW), the
exact merge kernels (which recompute the same pair in unmerge, so it is bit-exact), ``disabled``, named
adapters and per-sample routing. A forward costs what a rank-r² LoRA costs, plus forming the pair (r²·(in +
out) products). Like PEFT: A1, A2 Kaiming-uniform, B1 normal(0, 0.1), B2 zero, so the layer starts as the
base and every factor gets a gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional
from .base import LowRank
from .spec import AdapterSpec


class LowHadamard(LowRank):
    """The LoHa pair of one weight: factors ``A1, A2`` (r, fan_in) and ``B1, B2`` (fan_out, r).

    In the Tucker form (``spec.tucker`` on a kh×kw conv, PEFT's ``use_effective_conv2d``) each ``A_i`` is a core
    ``T_i`` (r, r, kh·kw) contracted with ``D_i`` (r, in/groups) (``functional.tucker_factor``), initialised
    as PEFT does: cores, ``D1`` and the ``B``s Kaiming-uniform (``B_i`` as PEFT's (r, out) ``w_a``, transposed),
    ``D2`` zero.
    """

    kind = "loha"

    def __init__(self, spec: AdapterSpec, fan_in: int, fan_out: int, *, kernel: int = 1, device=None, dtype=None):
        self._start(spec)
        r = spec.rank
        self.tucker = spec.tucker and kernel > 1
        if self.tucker:
            for i in (1, 2):
                setattr(self, f"T{i}", _kaiming(r, r, kernel, device=device, dtype=dtype))
                setattr(self, f"D{i}", _kaiming(r, fan_in // kernel, device=device, dtype=dtype))
                w_a = _kaiming(r, fan_out, device=device, dtype=dtype).detach()  # PEFT's (r, out) hada_w_a
                setattr(self, f"B{i}", nn.Parameter(w_a.t().contiguous()))
            nn.init.zeros_(self.D2)
            return
        self.A1 = nn.Parameter(torch.empty(r, fan_in, device=device, dtype=dtype))
        self.B1 = nn.Parameter(torch.empty(fan_out, r, device=device, dtype=dtype))
        self.A2 = nn.Parameter(torch.empty(r, fan_in, device=device, dtype=dtype))
        self.B2 = nn.Parameter(torch.zeros(fan_out, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A1, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.A2, a=math.sqrt(5))
        nn.init.normal_(self.B1, std=0.1)

    def factor_a(self, i: int) -> Tensor:
        """``A_i`` (r, fan_in): the parameter, or in the Tucker form its core contracted with ``D_i``."""
        if self.tucker:
            return functional.tucker_factor(getattr(self, f"T{i}"), getattr(self, f"D{i}"))
        return getattr(self, f"A{i}")

    def delta(self) -> Tensor:
        return functional.hadamard_delta(self.factor_a(1), self.B1, self.factor_a(2), self.B2)

    # functional.hadamard_pair, one half each: a forward reads A and B once each, and forms neither twice
    @property
    def A(self) -> Tensor:  # (r², fan_in)
        return functional.khatri_rao_rows(self.factor_a(1), self.factor_a(2))

    @property
    def B(self) -> Tensor:  # (fan_out, r²)
        return functional.khatri_rao_rows(self.B1.t(), self.B2.t()).t()

    def extra_repr(self) -> str:
        tucker = f", tucker core={tuple(self.T1.shape)}" if self.tucker else ""
        return (f"loha, rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, "
                f"fan_out={self.B1.shape[0]}{tucker}")


def _kaiming(*shape: int, device=None, dtype=None) -> nn.Parameter:
    """A parameter of ``shape``, Kaiming-uniform as ``nn.Linear`` and PEFT initialise (fan-in: the dims after the
    first)."""
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p
