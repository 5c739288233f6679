"""Adapted layers, and the table of the layer types peftlite adapts.

An adapted module is the same object, with its class swapped to a peftlite subclass of its own class
(``nn.Conv2d`` -> ``LoraConv2d``, timm's ``Conv2dSame`` -> ``LoraConv2dSame``). Its own parameters stay
where they were (``_parameters["weight"]``), so no state_dict key changes; the low-rank pairs are added
beside them under ``lora.<adapter name>`` (``layer4.0.conv1.lora.default.A``). The subclass adds:

- a ``weight`` property (``in_proj_weight`` and friends for ``nn.MultiheadAttention``) that returns
  ``W + scale·ΔW`` while the adapter is enabled and unmerged, so that code reading the weight directly
  (torchvision's Swin, ``nn.MultiheadAttention``, a subclass with its own forward) sees the adapter;
- for a layer with the stock ``nn.Linear`` / ``nn.Conv2d`` forward, a forward that adds the adapter
  through activations (``_linear_autograd``, ``_conv_autograd``), or for a conv through the merged
  weight with low-rank gradients, whichever the per-call cost model finds cheaper.

Merging is explicit state in ``LayerState``; nothing happens in ``train()`` / ``eval()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import _conv_autograd, _linear_autograd
from . import functional as F_
from ._effective import guard

DEFAULT_ADAPTER = "default"


class LowRank(nn.Module):
    """One low-rank pair for one weight: ΔW = B @ A, applied with ``scale = alpha / rank``.

    A: (rank, fan_in), Kaiming-uniform. B: (fan_out, rank), zeros, so the layer starts as the base.
    """

    def __init__(self, rank: int, fan_in: int, fan_out: int, alpha: float, dropout: float,
                 *, device=None, dtype=None):
        super().__init__()
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.A = nn.Parameter(torch.empty(rank, fan_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(fan_out, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, fan_in={self.A.shape[1]}, " \
               f"fan_out={self.B.shape[0]}"


@dataclass
class LayerState:
    """Explicit per-layer adapter state (not in the state_dict, except ``merged``: see get_extra_state)."""

    adapter: str = DEFAULT_ADAPTER
    enabled: bool = True
    merged: bool = False
    # slot -> record that makes unmerge bit-exact; missing when the merged state came from a state_dict
    records: dict = field(default_factory=dict)
    geometry: F_.ConvGeometry | None = None


class Adapted:
    """Mixin placed before the base class. Holds ``lora`` (an nn.ModuleDict) and ``_lora_state``."""

    _lora_kind: str  # "linear", "conv2d", "mha"
    _lora_base: type  # the class the module had before wrap

    def lora_pairs(self) -> dict[str, LowRank]:
        """The active adapter's pairs, by the parameter name they adapt (``{"weight": LowRank}``)."""
        pairs = self.lora[self._lora_state.adapter]
        return {"weight": pairs} if isinstance(pairs, LowRank) else dict(pairs.items())

    def get_extra_state(self) -> Tensor:
        # The merged flag travels with the state_dict, so a merged checkpoint is never merged twice.
        return torch.tensor([int(self._lora_state.merged)], dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        merged = bool(int(torch.as_tensor(state).reshape(-1)[0]))
        # The weights were just replaced by the loaded ones: any exact-unmerge record is stale.
        self._lora_state.records.clear()
        self._lora_state.merged = merged


def _slot_property(slot: str) -> property:
    def get(self):
        try:
            w = self._parameters[slot]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{slot}'") from None
        state = self.__dict__.get("_lora_state")
        if w is None or state is None or state.merged or not state.enabled:
            return w
        pair = self.lora_pairs().get(slot)
        if pair is None:
            return w
        return guard(F_.effective_weight(w, pair.A, pair.B, pair.scale))

    return property(get, doc=f"``{slot}`` with the adapter applied (W + scale·ΔW) while enabled and unmerged.")


class _LinearForward(Adapted):
    def forward(self, x: Tensor) -> Tensor:
        st = self._lora_state
        w = self._parameters["weight"]
        if st.merged or not st.enabled:
            return nn.functional.linear(x, w, self.bias)
        p = self.lora[st.adapter]
        if p.dropout > 0.0 and self.training:
            return F_.lora_linear(x, w, self.bias, p.A, p.B, p.scale, p.dropout, True)
        return _linear_autograd.lora_linear(x, w, self.bias, p.A, p.B, p.scale)


class _Conv2dForward(Adapted):
    def forward(self, x: Tensor) -> Tensor:
        st = self._lora_state
        w = self._parameters["weight"]
        if st.merged or not st.enabled:
            return F_.conv2d(x, w, self.bias, st.geometry)
        p = self.lora[st.adapter]
        if p.dropout > 0.0 and self.training:
            return F_.lora_conv2d(x, w, self.bias, p.A, p.B, p.scale, st.geometry, p.dropout, True)
        pixels = _output_pixels(x, st.geometry)
        if torch.is_grad_enabled() and (p.A.requires_grad or p.B.requires_grad):
            path = conv_training_path(st.geometry, p.rank, pixels)
            if path == "weight":
                return F_.lora_conv2d_weight_path(x, w, self.bias, p.A, p.B, p.scale, st.geometry)
        else:
            path = "activations" if conv_inference_path(st.geometry, p.rank, pixels) == "activations" else "merged"
        return _conv_autograd.lora_conv2d(x, w, self.bias, p.A, p.B, p.scale, st.geometry, path)


def _output_pixels(x: Tensor, geom: F_.ConvGeometry) -> int:
    """N·H'·W' of the conv's output (static shapes, so no graph break under torch.compile)."""
    if isinstance(geom.padding, str):
        return x.shape[0] * x.shape[-2] * x.shape[-1]  # 'same' keeps the size; 'valid' is close enough here
    size = 1
    dims = zip(x.shape[-2:], geom.kernel_size, geom.stride, geom.padding, geom.dilation, strict=True)
    for n, k, s, p, d in dims:
        size *= (n + 2 * p - d * (k - 1) - 1) // s + 1
    return x.shape[0] * size


# Forming W + scale·ΔW touches W about three times (read, temporary write, read by the conv); counted as
# this many multiply-adds per weight element, since those passes are memory-bound.
WEIGHT_PASS_COST = 8


def conv_inference_path(geom: F_.ConvGeometry, rank: int, pixels: int) -> str:
    """Which path runs an adapted conv more cheaply when no adapter gradient is needed.

    Activations: the A and B convs, ``r·(groups·fan_in + out)`` multiply-adds per output pixel.
    Weight: ΔW (``r·out·fan_in``) plus the memory-bound passes over W. Large feature maps (early layers,
    depthwise convs) take the weight path; small ones (late layers, small batches of large channels)
    the activations.
    """
    activations = pixels * rank * (geom.groups * geom.fan_in + geom.out_channels)
    weight = geom.out_channels * geom.fan_in * (rank + WEIGHT_PASS_COST)
    return "activations" if activations < weight else "weight"


# On CPU the r-wide products of the adapter (skinny matrix products) run at about half the rate of the
# base conv's; counted as this many multiply-adds per multiply-add.
RANK_PASS_COST = 2


def conv_training_path(geom: F_.ConvGeometry, rank: int, pixels: int | None = None) -> str:
    """Which path trains a conv's adapter most cheaply, counting multiply-adds over ``pixels`` outputs.

    With ``R = RANK_PASS_COST · r·(groups·fan_in + out)``, the cost of one r-wide pass over the pixels:

    - ``activations`` (``_conv_autograd``): three such passes (h and B h forward; ∂h, ∂B, ∂A and A's
      part of ∂x backward, in pairs), ``3·R`` per pixel;
    - ``merged`` (``_conv_autograd``): the base conv runs with ``W + scale·ΔW`` both ways, and only the
      adapter's gradients take r-wide passes (h recomputed, ∂h, ∂B, ∂A): ``2·R`` per pixel, plus forming
      the merged weight once, ``out·fan_in·(r + WEIGHT_PASS_COST)``;
    - ``weight`` (autograd on ``functional.lora_conv2d_weight_path``): the full weight-gradient conv,
      ``out·fan_in`` per pixel, plus forming ΔW and its gradients, ``out·fan_in·(3·r + WEIGHT_PASS_COST)``.

    Large feature maps take ``merged``, small ones (late layers, small batches) ``activations``, and
    convs with a tiny ``fan_in`` (depthwise) ``weight``. ``pixels=None`` is the many-pixel limit.
    """
    per_pixel = RANK_PASS_COST * rank * (geom.groups * geom.fan_in + geom.out_channels)
    weight_elems = geom.out_channels * geom.fan_in
    if pixels is None:
        return "merged" if 2 * per_pixel < weight_elems else "weight"
    costs = {
        "activations": 3 * per_pixel * pixels,
        "merged": 2 * per_pixel * pixels + weight_elems * (rank + WEIGHT_PASS_COST),
        "weight": weight_elems * (pixels + 3 * rank + WEIGHT_PASS_COST),
    }
    return min(costs, key=costs.get)


# ---- the table of supported layer types ----------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    name: str
    base: type
    slots: Callable[[nn.Module], tuple[str, ...]]  # the parameters that get adapters
    properties: tuple[str, ...]  # class properties that return effective weights
    fast: type | None  # forward mixin for modules that keep the stock forward
    stock: tuple[str, ...]  # methods that must be the base's for the fast forward to be exact


def _mha_slots(m: nn.MultiheadAttention) -> tuple[str, ...]:
    return ("in_proj_weight",) if m._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")


KINDS: dict[type, Kind] = {
    nn.MultiheadAttention: Kind("mha", nn.MultiheadAttention, _mha_slots,
                                ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"), None, ()),
    nn.Linear: Kind("linear", nn.Linear, lambda m: ("weight",), ("weight",), _LinearForward, ("forward",)),
    nn.Conv2d: Kind("conv2d", nn.Conv2d, lambda m: ("weight",), ("weight",), _Conv2dForward,
                    ("forward", "_conv_forward")),
}
SUPPORTED = tuple(KINDS)
SUPPORTED_NAMES = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED)


def kind_of(module: nn.Module) -> Kind | None:
    for base, kind in KINDS.items():
        if isinstance(module, base):
            return kind
    return None


_CLASSES: dict[type, type] = {}


def _reads(cls: type, kind: Kind) -> bool:
    """Does the class's own forward read one of the adapted attributes (so the property reaches it)?"""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is kind.base:
            break
        fwd = klass.__dict__.get("forward")
        if fwd is not None and hasattr(fwd, "__code__"):
            names |= set(fwd.__code__.co_names)
    return bool(names & set(kind.properties))


def adapted_class(cls: type, kind: Kind) -> type:
    """The peftlite subclass of ``cls`` (cached).

    Raises:
        TypeError: ``cls`` has its own forward that never reads the adapted weight, so its semantics
            could not be kept.
    """
    if cls in _CLASSES:
        return _CLASSES[cls]
    stock = kind.fast is not None and all(getattr(cls, m) is getattr(kind.base, m) for m in kind.stock)
    if not stock and cls is not kind.base and not _reads(cls, kind):
        raise TypeError(
            f"{cls.__module__}.{cls.__name__} overrides forward and never reads "
            f"{'/'.join(kind.properties)}, so peftlite cannot adapt it without changing what it computes; "
            f"target its inner layers instead, or exclude it from targets"
        )
    mixin = kind.fast if stock else Adapted
    ns = {p: _slot_property(p) for p in kind.properties}
    ns.update(_lora_kind=kind.name, _lora_base=cls, __module__=__name__, __qualname__=f"Lora{cls.__name__}")
    _CLASSES[cls] = type(f"Lora{cls.__name__}", (mixin, cls), ns)
    return _CLASSES[cls]


LoraLinear = adapted_class(nn.Linear, KINDS[nn.Linear])
LoraConv2d = adapted_class(nn.Conv2d, KINDS[nn.Conv2d])
LoraMultiheadAttention = adapted_class(nn.MultiheadAttention, KINDS[nn.MultiheadAttention])


def check_adaptable(name: str, module: nn.Module) -> Kind:
    """The module's kind, or a TypeError that says why it cannot be adapted; changes nothing."""
    if isinstance(module, Adapted):
        raise TypeError(f"module {name!r} is already adapted ({type(module).__name__}); "
                        "unwrap the model first, or leave it out of targets")
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"module {name!r} is a {type(module).__name__}, which peftlite cannot adapt; "
                        f"supported types: {SUPPORTED_NAMES}. Use it as a head or trainable module instead")
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise TypeError(f"module {name!r} is parametrized (torch.nn.utils.parametrize); "
                        "remove the parametrization before wrapping")
    for slot in kind.slots(module):
        w = module._parameters.get(slot)
        if not isinstance(w, nn.Parameter) or isinstance(w, nn.parameter.UninitializedParameter):
            raise TypeError(f"module {name!r} has no initialised parameter {slot!r} (lazy module or weight "
                            "hook?); run one forward pass or remove the hook before wrapping")
        if isinstance(getattr(type(module), slot, None), property):
            raise TypeError(f"{type(module).__name__}.{slot} is already a property; peftlite cannot adapt it")
    adapted_class(type(module), kind)  # raises when the forward semantics could not be kept
    return kind


def attach(module: nn.Module, kind: Kind, *, rank: int, alpha: float, dropout: float,
           adapter: str = DEFAULT_ADAPTER) -> None:
    """Turn ``module`` into its adapted class, with fresh pairs (B = 0, so outputs are unchanged)."""
    pairs = {}
    for slot in kind.slots(module):
        w = module._parameters[slot]
        dtype = torch.promote_types(w.dtype, torch.float32)  # adapters keep fp32 master precision
        pairs[slot] = LowRank(rank, w[0].numel(), w.shape[0], alpha, dropout, device=w.device, dtype=dtype)
    state = LayerState(adapter=adapter)
    if kind.name == "conv2d":
        state.geometry = F_.ConvGeometry.of(module)
    module.__class__ = adapted_class(type(module), kind)
    module.lora = nn.ModuleDict({adapter: pairs["weight"] if list(pairs) == ["weight"] else nn.ModuleDict(pairs)})
    module._lora_state = state


def detach(module: Adapted) -> None:
    """Give the module back its own class, dropping the adapters (the caller merged or unmerged first)."""
    del module.lora
    del module._lora_state
    module.__class__ = module._lora_base
