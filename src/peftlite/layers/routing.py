"""Per-sample routing: each batch row through its own adapter, in one batched pass per layer.

``peftlite.per_sample`` puts a route into ``ROUTE``, a context variable (so each thread, and each task,
has its own): ``{id(layer): Routed}`` for every adapted layer of the model. ``Routed.slots`` is an index
tensor (N,): row n uses the layer's adapter number ``slots[n]`` (its position in ``layer.lora``), or
the base for -1. An index tensor, not a list of names, so that ``torch.compile`` guards its shape only
and a new mix of adapters does not recompile.

The computations below take the layer's factors as lists (one entry per adapter, in ``layer.lora``
order), so that every row's result is exactly its own adapter's:

    y[n] = base(x[n]) + scale_k · B_k A_k x[n]      with k = slots[n]   (nothing added for -1)

- Linear, inference on CPU float32 (eager): the C kernel (``kernels.route``) reads each adapter's
  factors once, rows grouped by adapter.
- Otherwise (training, torch.compile, other dtypes or devices): the factors are stacked (rank-padded
  with zeros, plus a zero slot for -1) and gathered per row; one ``bmm`` pair for a Linear, one grouped
  conv pair for a Conv2d (the batch folded into the groups). Static shapes, differentiable.
"""

from __future__ import annotations

import contextvars
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional
from ..functional import ConvGeometry
from ..kernels.route import route_linear_
from .dora import gain


class Routed(NamedTuple):
    """One layer's share of a route."""

    name: str  # the layer's qualified name, for errors
    slots: Tensor  # (N,) int64: the layer's adapter number for each row, -1 for the base
    routed: bool  # does any row use one of this layer's adapters?
    used: tuple[int, ...]  # the adapter numbers the route uses on this layer, in order
    packed: Tensor  # (N,) int64: each row's position in ``used``, -1 for the base (what the C kernel reads)


ROUTE: contextvars.ContextVar[dict[int, Routed] | None] = contextvars.ContextVar("peftlite_route", default=None)


def lookup(layer) -> Routed | None:
    """The layer's share of the current thread's route, or None outside ``per_sample``."""
    route = ROUTE.get()
    return None if route is None else route.get(id(layer))


def routes_any(layers) -> bool:
    """Is any of ``layers`` routed by a ``per_sample`` block in force in this thread?"""
    route = ROUTE.get()
    return route is not None and any(id(m) in route for m in layers)


def _check_rows(route: Routed, x: Tensor) -> None:
    if route.slots.shape[0] != x.shape[0]:
        raise ValueError(f"per_sample: the route has {route.slots.shape[0]} entries but the batch reaching "
                         f"{route.name} has {x.shape[0]} rows; give one adapter name (or None) per row")


def _stacked(As: list[Tensor], Bs: list[Tensor], scales: list, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's (A, scale·B), rank-padded: (N, R, fan_in) and (N, out, R); zeros for -1 rows."""
    R = max(a.shape[0] for a in As)
    dtype = torch.promote_types(As[0].dtype, torch.float32)
    A = torch.stack([F.pad(a.to(dtype), (0, 0, 0, R - a.shape[0])) for a in As] + [As[0].new_zeros(R, As[0].shape[1],
                                                                                                     dtype=dtype)])
    B = torch.stack([F.pad(b.to(dtype) * s, (0, R - b.shape[1])) for b, s in zip(Bs, scales, strict=True)]
                    + [Bs[0].new_zeros(Bs[0].shape[0], R, dtype=dtype)])
    rows = torch.where(slots < 0, len(As), slots)
    return A[rows], B[rows]


def _dropped(x: Tensor, slots: Tensor, dropouts: list[float]) -> Tensor:
    """x with each row dropped out at its own adapter's rate (training only)."""
    p = torch.tensor(list(dropouts) + [0.0], device=x.device, dtype=x.dtype)[torch.where(slots < 0, len(dropouts),
                                                                                            slots)]
    p = p.view(-1, *([1] * (x.dim() - 1)))
    return x * (torch.rand_like(x) >= p) / (1 - p)


def operands(weight: Tensor, pairs: list, route: Routed) -> tuple[list, list, list, list[float], list]:
    """What ``linear`` and ``conv2d`` take of a layer's adapters (``pairs``, in ``layer.lora`` order): the
    A and B factors, scales, dropouts and DoRA row factors (``gains``)."""
    As = [p._parameters["A"] if p.kind == "lora" else p.A for p in pairs]  # a parameter, or LoHa's / LoKr's pair
    Bs = [p._parameters["B"] if p.kind == "lora" else p.B for p in pairs]
    scales = [p.effective_scale for p in pairs]
    return As, Bs, scales, [p.dropout for p in pairs], gains(weight, pairs, As, Bs, scales, route)


def gains(weight: Tensor, pairs: list, As: list[Tensor], Bs: list[Tensor], scales: list, route: Routed) -> list:
    """Each adapter's DoRA row factor (``dora.gain``), or None for a plain LoRA adapter; eager calls
    compute it for the adapters the route uses only (a compiled one for all: its structure stays fixed)."""
    wanted = range(len(pairs)) if torch.compiler.is_compiling() else route.used
    out = [None] * len(pairs)
    for k in wanted:
        if pairs[k].variant == "dora":
            out[k] = gain(weight, As[k], Bs[k], scales[k], pairs[k])
    return out


def _rescaled(y: Tensor, bias: Tensor | None, slots: Tensor, gains: list, channel_dims: int) -> Tensor:
    """DoRA rows: ``y[n] * g_k + b`` for a row whose adapter is DoRA, ``y[n] + b`` for the others."""
    ones = y.new_ones(y.shape[1] if channel_dims else y.shape[-1])
    G = torch.stack([ones if g is None else g.to(y.dtype) for g in gains] + [ones])[torch.where(slots < 0, len(gains),
                                                                                               slots)]  # (N, out)
    G = G.view(G.shape[0], *([1] * (y.dim() - 2)), -1) if not channel_dims else G.view(*G.shape, *([1] * channel_dims))
    y = y * G
    if bias is None:
        return y
    return y + (bias.view(-1, *([1] * channel_dims)) if channel_dims else bias)


def routed_linear_delta(x: Tensor, slots: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list,
                 dropouts: list[float], training: bool) -> Tensor:
    """Σ of each row's own ``scale·(x A_kᵀ) B_kᵀ`` by stacked factors.  x: (N, ..., in) -> (N, ..., out)."""
    if training and any(dropouts):
        x = _dropped(x, slots, dropouts)
    A, B = _stacked(As, Bs, scales, slots)  # (N, R, in), (N, out, R)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, in)
    h = torch.bmm(x3.to(A.dtype), A.transpose(1, 2))  # (N, T, R)
    return torch.bmm(h, B.transpose(1, 2)).reshape(*x.shape[:-1], B.shape[1])  # (N, ..., out)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, route: Routed, As: list[Tensor], Bs: list[Tensor],
           scales: list, dropouts: list[float], dora: list, training: bool) -> Tensor:
    """The routed adapted Linear: ``x @ Wᵀ + b`` plus each row's own adapter (``dora``: per adapter, its
    DoRA row factor or None)."""
    _check_rows(route, x)
    rescale = any(g is not None for g in dora)
    y = F.linear(x, weight, None if rescale else bias)
    fast = not torch.compiler.is_compiling() and not (training and any(dropouts)) \
        and not (torch.is_grad_enabled() and (x.requires_grad or any(As[k].requires_grad or Bs[k].requires_grad
                                                                     for k in route.used)))
    if not (fast and route_linear_(y, x, route.packed, [As[k] for k in route.used], [Bs[k] for k in route.used],
                                   [float(scales[k]) for k in route.used])):
        y = y + routed_linear_delta(x, route.slots, As, Bs, scales, dropouts, training).to(y.dtype)
    return _rescaled(y, bias, route.slots, dora, 0) if rescale else y


def with_residual(y: Tensor, slots: Tensor, owner: int, delta: Tensor) -> Tensor:
    """``y`` plus ``delta`` on the rows that do not use adapter number ``owner``: the principal part a PiSSA or
    OLoRA init took out of the base weights (layers/principal.py), added back where that adapter is not used.
    y, delta: (N, ...); slots: (N,)."""
    keep = (slots == owner).view(-1, *([1] * (y.dim() - 1)))
    return torch.where(keep, y, y + delta.to(y.dtype))


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, route: Routed, geom: ConvGeometry, As: list[Tensor],
           Bs: list[Tensor], scales: list, dropouts: list[float], dora: list, training: bool) -> Tensor:
    """The routed adapted Conv2d: the base conv plus each row's own ``scale·conv(x, ΔW_k)``, every geometry.

    The batch is folded into the groups: the input becomes one sample of ``N·in`` channels, and each row's
    filters (A_k repeated per conv group, then B_k as a grouped 1x1 conv) act on its own channels.
    """
    _check_rows(route, x)
    rescale = any(d is not None for d in dora)
    xp, g = functional.pad_input(x, geom)
    y = F.conv2d(xp, weight, None if rescale else bias, g.stride, g.padding, g.dilation, g.groups)  # (N, out, H', W')
    if training and any(dropouts):
        xp, g = functional.pad_input(_dropped(x, route.slots, dropouts), geom)
    A, B = _stacked(As, Bs, scales, route.slots)  # (N, R, fan_in), (N, out, R)
    n, r = A.shape[0], A.shape[1]
    kh, kw = g.kernel_size
    a = A.reshape(n, 1, r, g.in_channels // g.groups, kh, kw).expand(n, g.groups, r, -1, kh, kw)
    a = a.reshape(n * g.groups * r, g.in_channels // g.groups, kh, kw)  # per row, per conv group, r filters
    h = F.conv2d(xp.to(a.dtype).reshape(1, -1, *xp.shape[2:]), a, None, g.stride, g.padding, g.dilation,
                 n * g.groups)  # (1, N·G·r, H', W')
    b = B.reshape(n * g.out_channels, r, 1, 1)  # each conv group's out/G outputs read that group's r channels
    d = F.conv2d(h, b, None, 1, 0, 1, n * g.groups).reshape(y.shape)
    y = y + d.to(y.dtype)
    return _rescaled(y, bias, route.slots, dora, 2) if rescale else y
