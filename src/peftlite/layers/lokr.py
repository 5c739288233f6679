"""LoKr: ΔW = W1 ⊗ W2 (the Kronecker product), applied with ``scale = alpha / r``, as PEFT and LyCORIS define it.

The weight's (out, fan_in) matrix splits as out = out_l·out_k and fan_in = in_m·c2, with c2 = in_n·kh·kw
for a Conv2d (the kernel sits on W2, the channels in/groups split as in_m·in_n):

    W1: (out_l, in_m), full, or B1 @ A1 with B1 (out_l, r), A1 (r, in_m)
    W2: (out_k, c2),   full, or B2 @ A2 with B2 (out_k, r), A2 (r, c2)

The split is PEFT's when wrapping (``functional.factorization`` with ``AdapterSpec.decompose_factor``; W1 low-rank only
with ``decompose_both`` and ``r < max(out_l, in_m) / 2``, W2 low-rank when ``r < max(out_k, in_n) / 2``),
and the one a file's tensors have when loading (``AdapterSpec.kron`` and ``full``). Like PEFT: W1 (or B1)
starts at zero, the rest Kaiming-uniform, so the layer starts as the base.

Forwards never form ΔW where the structure allows (``functional.kron_linear``, ``functional.kron_conv2d``);
the exact merge kernels take ΔW's rows from ``kron_delta`` (each element one product, so unmerge is
bit-exact). ``A`` and ``B`` read the pair of rank rank(W1)·rank(W2) whose product is exactly ΔW, for the
paths that take a low-rank pair (per-sample routing): exact, but wide when a factor is full.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional
from .base import LowRank
from .spec import AdapterSpec


def layout(spec: AdapterSpec, fan_in: int, fan_out: int, kernel: int) -> tuple[tuple[int, int], tuple[bool, bool]]:
    """``((out_l, in_m), (W1 full, W2 full))`` of a LoKr pair on a (fan_out, fan_in) weight, ``kernel`` elements
    per input channel: the spec's own when it has one (a file's), else PEFT's rule.

    Raises:
        ValueError: a given split that does not divide the weight's dimensions.
    """
    in_dim = fan_in // kernel
    if spec.kron is None:
        (out_l, out_k), (in_m, in_n) = functional.factorization(fan_out, spec.decompose_factor), \
            functional.factorization(in_dim, spec.decompose_factor)
    else:
        (out_l, in_m) = spec.kron
        if fan_out % out_l or in_dim % in_m:
            raise ValueError(f"a LoKr split kron={list(spec.kron)} does not fit a weight of {fan_out} outputs and "
                             f"{in_dim} input channels: out_l must divide {fan_out} and in_m {in_dim}")
        out_k, in_n = fan_out // out_l, in_dim // in_m
    if spec.full is not None:
        return (out_l, in_m), spec.full
    r = spec.rank
    return (out_l, in_m), (not (spec.decompose_both and r < max(out_l, in_m) / 2), not r < max(out_k, in_n) / 2)


def _as_pair(W: Tensor | None, A: Tensor | None, B: Tensor | None) -> tuple[Tensor, Tensor]:
    """One factor as ``(A, B)`` with ``B @ A`` exactly it: its low-rank factors, or a full W beside an identity
    on its shorter side (every product then a single term)."""
    if W is None:
        return A, B
    eye = lambda n: torch.eye(n, dtype=W.dtype, device=W.device)
    return (W, eye(W.shape[0])) if W.shape[0] <= W.shape[1] else (eye(W.shape[1]), W)


class LowKronecker(LowRank):
    """The LoKr factors of one weight (module docstring): ``W1`` or ``A1, B1``; ``W2`` or ``A2, B2``."""

    kind = "lokr"

    def __init__(self, spec: AdapterSpec, fan_in: int, fan_out: int, *, kernel: int = 1, device=None, dtype=None):
        self._start(spec)
        r = spec.rank
        self.decompose_factor, self.decompose_both = spec.decompose_factor, spec.decompose_both
        (out_l, in_m), self.full = layout(spec, fan_in, fan_out, kernel)
        self.kron = (out_l, in_m)
        out_k, c2 = fan_out // out_l, fan_in // in_m
        new = lambda *shape: nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))
        self.W1 = self.A1 = self.B1 = self.W2 = self.A2 = self.B2 = None
        if self.full[0]:
            self.W1 = nn.Parameter(torch.zeros(out_l, in_m, device=device, dtype=dtype))
        else:
            self.A1, self.B1 = new(r, in_m), nn.Parameter(torch.zeros(out_l, r, device=device, dtype=dtype))
        self.tucker = spec.tucker and kernel > 1 and not self.full[1]  # PEFT: a Tucker W2 only when low-rank
        if self.full[1]:
            self.W2 = new(out_k, c2)
        elif self.tucker:  # W2 = B2 @ (T2 contracted with D2), PEFT's lokr_t2 / lokr_w2_a (r, out_k) / lokr_w2_b
            self.T2, self.D2, b2 = new(r, r, kernel), new(r, c2 // kernel), new(r, out_k)
            nn.init.kaiming_uniform_(b2, a=math.sqrt(5))
            self.B2 = nn.Parameter(b2.detach().t().contiguous())
        else:
            self.A2, self.B2 = new(r, c2), new(out_k, r)
        for p in (self.A1, self.W2, self.A2, self.B2, getattr(self, "T2", None), getattr(self, "D2", None)):
            if p is not None and not (self.tucker and p is self.B2):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(W1, W2)``: (out_l, in_m), (out_k, c2); formed from their low-rank factors where they have them."""
        W1 = self.W1 if self.W1 is not None else self.B1 @ self.A1
        W2 = self.W2 if self.W2 is not None else self.B2 @ self.factor_a2()
        return W1, W2

    def factor_a2(self) -> Tensor | None:
        """``A2`` (r, c2): the parameter, or in the Tucker form ``T2`` contracted with ``D2``; None for a full W2."""
        return functional.tucker_factor(self.T2, self.D2) if self.tucker else self.A2

    def factor_parts(self) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor | tuple[Tensor, Tensor]]:
        """W1 and W2 as stored: a full factor, or its ``(B, A)`` (the merge kernels form the product themselves,
        in a fixed order)."""
        return (self.W1 if self.W1 is not None else (self.B1, self.A1),
                self.W2 if self.W2 is not None else (self.B2, self.factor_a2()))

    def delta(self) -> Tensor:
        return functional.kron_delta(*self.decompose_factors())

    @property
    def A(self) -> Tensor:  # (rank(W1)·rank(W2), fan_in)
        return torch.kron(_as_pair(self.W1, self.A1, self.B1)[0], _as_pair(self.W2, self.factor_a2(), self.B2)[0])

    @property
    def B(self) -> Tensor:  # (fan_out, rank(W1)·rank(W2))
        return torch.kron(_as_pair(self.W1, self.A1, self.B1)[1], _as_pair(self.W2, self.factor_a2(), self.B2)[1])

    @property
    def spec(self) -> AdapterSpec:
        return super().spec.replace(kron=self.kron, full=self.full, decompose_factor=self.decompose_factor,
                                    decompose_both=self.decompose_both)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters(recurse=False))
        return f"lokr, rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, {shapes}"
