"""What every adapted layer has: the low-rank pairs, the per-layer state, and the adapter protocol.

An adapted layer is the user's own module object with its class swapped to a peftlite subclass
(``nn.Linear`` -> ``LoraLinear``). Its base parameters stay where they were (``_parameters["weight"]``),
so no state_dict key changes; each named adapter's pair is added beside them under ``lora.<name>``
(``layer4.0.conv1.lora.default.A``). ``AdaptedLayer`` is the protocol the rest of peftlite (merging,
files, summary, the toolkit) reads; nothing outside ``layers`` touches a private attribute of a layer.

Several adapters may live on one layer. ``LayerState.active`` says which ones the forward computes and
with what weight; the layer folds them into one pair (``functional.fold``), so the forward, the
effective weight and the merge see one ``(A, B, scale)`` whatever the combination.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .. import functional
from ._guard import effective
from .routing import lookup
from .spec import AdapterSpec, scale_of

DEFAULT_ADAPTER = "default"




class LowRank(nn.Module):
    """One low-rank pair for one weight: ΔW = B @ A, applied with ``scale = alpha / rank`` (or, with
    ``rank_scaling="sqrt"``, rsLoRA's ``alpha / sqrt(rank)``).

    A: (rank, fan_in), Kaiming-uniform. B: (fan_out, rank), zeros, so the layer starts as the base.
    ``variant="dora"`` adds ``magnitude`` (fan_out,): the layer computes ``m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖``
    per output row (weight-decomposed LoRA), and ``attach`` starts m at ‖W‖ so that it starts as the base.
    ``scale_buffer`` (a 0-d tensor, not saved) replaces the Python scale once the pair is prepared for
    hot-swapping (``peftlite.prepare_hotswap``), so that a compiled forward reads no Python number.
    """

    kind = "lora"  # AdapterSpec.kind: what ΔW is made of (loha.LowHadamard: "loha", lokr.LowKronecker: "lokr")

    def __init__(self, spec: AdapterSpec, fan_in: int, fan_out: int, *, kernel: int = 1, device=None, dtype=None):
        """``kernel``: the weight's elements per input channel (kh·kw of a Conv2d); LoKr splits the channels."""
        self._start(spec)
        rank = spec.rank
        self.A = nn.Parameter(torch.empty(rank, fan_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(fan_out, rank, device=device, dtype=dtype))
        if spec.variant == "dora":
            self.magnitude = nn.Parameter(torch.ones(fan_out, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def _start(self, spec: AdapterSpec) -> None:
        """What every pair kind has: the module, the hyper-parameters as plain attributes (read on every forward;
        hot-swapping and loading a file reassign alpha and rank_scaling), no magnitude, no scale buffer."""
        nn.Module.__init__(self)
        self.rank, self.alpha, self.dropout = spec.rank, spec.alpha, spec.dropout
        self.variant, self.rank_scaling = spec.variant, spec.rank_scaling
        self.magnitude = None
        self.register_buffer("scale_buffer", None, persistent=False)

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank, self.rank_scaling)

    def delta(self) -> Tensor:
        """ΔW as a matrix (fan_out, fan_in), unscaled, with autograd to the factors: the dense reference."""
        return self.B @ self.A

    @property
    def spec(self) -> AdapterSpec:
        """The pair's hyper-parameters as an ``AdapterSpec`` (a hot-swap slot that holds no adapter has none)."""
        return AdapterSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout, variant=self.variant,
                           rank_scaling=self.rank_scaling, kind=self.kind, tucker=getattr(self, "tucker", False))

    @property
    def off(self) -> bool:
        """A hot-swap pair that holds no adapter on this layer (alpha 0): left out of files."""
        return self.alpha == 0.0

    @property
    def effective_scale(self) -> float | Tensor:
        """What the forward multiplies by: ``scale_buffer`` once prepared for hot-swapping, else ``scale``."""
        buffer = self._buffers["scale_buffer"]  # read directly: this runs per adapter in routed forwards
        return buffer if buffer is not None else self.scale

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("variant", self.variant), ("rank_scaling", self.rank_scaling))
                        if v not in ("lora", "linear"))
        return (f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, fan_in={self.A.shape[1]}, "
                f"fan_out={self.B.shape[0]}{extra}")


class Term(NamedTuple):
    """One active adapter's contribution to one weight: ``scale · B @ A``, its input dropped out by ``dropout``;
    for DoRA, the pair itself (``dora``), whose magnitude rescales the adapted weight's rows. A LoKr term
    has no (A, B) (its exact pair can be as wide as the weight): ``kron`` holds its factors ``(W1, W2)``."""

    A: Tensor | None
    B: Tensor | None
    scale: float | Tensor  # a 0-d tensor once prepared for hot-swapping
    dropout: float
    dora: LowRank | None = None
    kron: tuple[Tensor, Tensor] | None = None

    def delta(self) -> Tensor:
        """``scale·ΔW`` as a matrix (fan_out, fan_in), with autograd: the dense form every kind has."""
        return self.scale * (functional.kron_delta(*self.kron) if self.kron is not None else self.B @ self.A)


class AdapterStateError(ValueError, RuntimeError):
    """The call needs the model's adapters in another state: not merged into the weights, outside
    ``peftlite.per_sample`` or ``peftlite.disabled``. The one exception every such refusal raises (wrap, load,
    use, delete, combine, merge, hot-swapping); a subclass of both ``ValueError`` and ``RuntimeError``, which
    those refusals raised before, so ``except`` clauses written for either still catch it."""


@dataclass
class Residual:
    """What a principal-component init (PiSSA, OLoRA; layers/principal.py) took out of the layer's base weights.

    Each adapted slot's weight holds ``W - scale·B0 @ A0`` (written by the exact merge kernels), and the
    owner adapter's pairs hold ``A0``, ``B0`` as persistent buffers. ``records`` make the way back to W
    bit-exact while the weight holds the bits they were written for (``digests``, checked before they are
    used): a state_dict of this run loaded back keeps it exact; other weights are restored by recomputing.
    """

    owner: str  # the adapter started from the principal part
    scales: dict[str, float]  # slot -> the scale the residual was written with
    records: dict = field(default_factory=dict)  # slot -> MergeRecord of that write
    digests: dict = field(default_factory=dict)  # slot -> digest of the residual weight's bits as written
    init: str = "pissa"  # AdapterSpec.init that wrote it: "pissa", "pissa_niter_N" or "olora"


@dataclass
class LayerState:
    """Explicit per-layer adapter state. Only ``merged`` travels in the state_dict (``_extra_state``)."""

    # adapter name -> weight, of the adapters the forward computes (in order); {} computes the base
    active: dict[str, float] = field(default_factory=lambda: {DEFAULT_ADAPTER: 1.0})
    enabled: bool = True  # False inside ``peftlite.disabled``: the base layer's behaviour
    merged: bool = False  # the active combination is folded into the weights
    # slot -> the record that makes unmerge bit-exact; empty when the merged state came from a state_dict
    records: dict = field(default_factory=dict)
    # slot -> the shared (tied) parameter that ``merge(untie=True)`` replaced by the layer's own copy
    untied: dict = field(default_factory=dict)
    residual: Residual | None = None  # the base weights hold a PiSSA/OLoRA residual

    @property
    def computes_adapter(self) -> bool:
        """Does the forward add terms itself (not folded into the weight; adapters enabled and active, or a
        residual base whose principal part must be added back)?"""
        if self.merged:
            return False
        return (self.enabled and bool(self.active)) or self.residual_weight != 0.0

    @property
    def residual_weight(self) -> float:
        """The weight of the frozen ``scale·B0 A0`` term that gives back the original weights: 1 minus the owner's
        active weight (1 while disabled or when the owner is not active; 0 without a residual)."""
        if self.residual is None:
            return 0.0
        return 1.0 - (self.active.get(self.residual.owner, 0.0) if self.enabled else 0.0)


class AdaptedLayer:
    """The adapter protocol, and the mixin placed before the base class of every adapted layer.

    Class attributes:
        adapter_kind: ``"linear"``, ``"conv2d"`` or ``"mha"``.
        base_class: the class the module had before ``wrap`` (``unwrap`` gives it back).
    Instance attributes:
        lora: ``nn.ModuleDict`` adapter name -> ``LowRank`` (one adapted weight) or ``nn.ModuleDict``
            slot -> ``LowRank`` (several, e.g. ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``).
        adapter_state: the ``LayerState``.
    """

    adapter_kind: ClassVar[str]
    base_class: ClassVar[type]
    lora: nn.ModuleDict
    adapter_state: LayerState

    def adapters(self) -> dict[str, dict[str, LowRank]]:
        """Every adapter of the layer, in creation order: ``{name: {adapted parameter name: LowRank}}``."""
        return {name: self.pairs(name) for name in self.lora}

    def weight_pairs(self) -> list[LowRank]:
        """Every adapter's pair, in creation order, for a layer that adapts one weight (Linear, Conv2d)."""
        return list(self.lora._modules.values())  # read directly: routed forwards call this on every batch

    def pairs(self, name: str) -> dict[str, LowRank]:
        """One adapter's pairs, by the parameter name they adapt (``{"weight": LowRank}``)."""
        pairs = self.lora[name]
        return {"weight": pairs} if isinstance(pairs, LowRank) else dict(pairs.items())

    def terms(self, slot: str) -> list[Term]:
        """The active adapters' contributions to parameter ``slot`` (weights folded into the scales).

        Raises:
            RuntimeError: a DoRA adapter active with others, or weighted: magnitudes do not add
                (``peftlite.use`` refuses such combinations before they get here).
        """
        state = self.adapter_state
        out, weights = [], []
        for name, weight in (state.active if state.enabled else {}).items():
            pair = self.pairs(name).get(slot)
            if pair is None:
                continue
            if pair.kind == "lokr":
                out.append(Term(None, None, pair.effective_scale * weight, pair.dropout, kron=pair.factors()))
            else:
                out.append(Term(pair.A, pair.B, pair.effective_scale * weight, pair.dropout,
                                pair if pair.variant == "dora" else None))
            weights.append(weight)
        if any(t.dora is not None for t in out) and (len(out) > 1 or weights[0] != 1.0):
            raise RuntimeError(f"a DoRA adapter is active with others or weighted ({self.adapter_state.active}); "
                               "magnitudes do not add: use it alone")
        rest = self.residual_term(slot)
        if rest is not None:
            if out and out[0].dora is not None:
                raise RuntimeError(f"a DoRA adapter is active ({state.active}) on a layer whose base holds the "
                                   f"residual of {state.residual.owner!r}'s principal init, which DoRA cannot "
                                   "rescale; call "
                                   "peftlite.restore_base(model) first, or use the principal adapter")
            out.append(rest)
        return out

    def residual_term(self, slot: str, weight: float | None = None) -> Term | None:
        """The frozen ``weight·scale·B0 A0`` that adds back what a principal init took out of ``slot`` (weight:
        ``LayerState.residual_weight`` by default), or None (no residual, or weight 0)."""
        state = self.adapter_state
        weight = state.residual_weight if weight is None else weight
        if state.residual is None or weight == 0.0 or slot not in state.residual.scales:
            return None
        pair = self.pairs(state.residual.owner)[slot]
        return Term(pair.A0, pair.B0, state.residual.scales[slot] * weight, 0.0)

    def folded(self, slot: str) -> tuple[Tensor, Tensor, float] | None:
        """The active combination on ``slot`` as one ``(A, B, scale)`` (``functional.fold``), or None.

        A DoRA adapter is only ever active alone (``peftlite.use`` refuses to sum or weight it): its
        magnitude is applied by the caller (``dora.gain``).
        """
        terms = self.terms(slot)
        if not terms:
            return None
        if any(t.kron is not None for t in terms):
            raise RuntimeError("folded: a LoKr adapter is active, which has no low-rank pair to fold; take "
                               "AdaptedLayer.delta(slot) instead")
        return functional.fold([t.A for t in terms], [t.B for t in terms], [t.scale for t in terms])

    def delta(self, slot: str) -> Tensor | None:
        """``Σ scale·ΔW`` of the active adapters on ``slot`` as a dense (fan_out, fan_in) matrix (autograd to
        the factors), or None: what a layer adds to a weight it hands to code that reads it."""
        terms = self.terms(slot)
        return sum(t.delta() for t in terms) if terms else None

    def dora_term(self, slot: str) -> Term | None:
        """The active DoRA term on ``slot`` (then the only active one), or None."""
        terms = self.terms(slot)
        return terms[0] if len(terms) == 1 and terms[0].dora is not None else None

    def get_extra_state(self) -> Tensor:
        # The merged flag travels with the state_dict, so a merged checkpoint is never merged twice.
        return torch.tensor([int(self.adapter_state.merged)], dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        merged = bool(int(torch.as_tensor(state).reshape(-1)[0]))
        # The weights were just replaced by the loaded ones: any exact-unmerge record is stale.
        self.adapter_state.records.clear()  # (a residual's records stay: checked against their digests first)
        self.adapter_state.merged = merged


def effective_weight_property(slot: str) -> property:
    """A class property for parameter ``slot`` that returns ``W + Σ scale·ΔW`` while adapters are computed.

    Code that reads the weight instead of calling the layer (torchvision's Swin, ``nn.MultiheadAttention``,
    a subclass with its own forward) sees the adapters, so they are never bypassed. The raw parameter is
    returned while merged, disabled, or before the layer's state exists. Inside ``peftlite.per_sample``
    there is no single weight per batch: a routed layer refuses to be read. The value returned is lazy
    (``_guard.EffectiveWeight``): its dtype, shape and device cost nothing (T5 reads ``wo.weight.dtype``
    before each call), and ``W + scale·ΔW`` is built once its values are used, with autograd to A and B.

    A sharded parameter (a ``DTensor``: FSDP2's ``fully_shard`` between forwards) is returned as it is:
    its readers then are FSDP itself (its lazy init checks that ``module.weight`` is the parameter it
    sharded) or code that wants the shard, and the adapters (sharded alike) cannot be added to it. In
    the forward FSDP2 has swapped in the gathered plain parameters, so the adapters apply as usual.
    """
    plain = (nn.Parameter, Tensor)

    def sharded(w: Tensor) -> bool:
        if type(w) in plain:  # the common case costs one type check
            return False
        dtensor = getattr(torch.distributed, "tensor", None)  # there once imported: a DTensor exists only then
        return dtensor is not None and isinstance(w, dtensor.DTensor)

    def get(self):
        try:
            w = self._parameters[slot]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{slot}'") from None
        state = self.__dict__.get("adapter_state")
        if w is None or state is None or sharded(w):
            return w
        route = lookup(self)
        if route is not None:
            if route.routed:
                raise RuntimeError(
                    f"{route.name}: its weight is read directly (by its parent, or by its own forward), so one "
                    "batch cannot use a different adapter per row there; leave this layer's adapters out of "
                    "the per_sample route, or run the rows in separate batches with peftlite.use")
            rest = None if state.merged else self.residual_term(slot, 1.0)  # every row: the original weight
            return w if rest is None else effective(functional.effective_weight, w, rest.A, rest.B, rest.scale)
        terms = self.terms(slot) if state.computes_adapter else None
        if not terms:
            return w
        if terms[0].dora is not None:  # then the only term (``terms`` says so)
            t = terms[0]
            return effective(functional.dora_weight, w, t.A, t.B, t.scale, t.dora.magnitude)
        if any(t.kron is not None for t in terms):  # LoKr: the dense ΔW (a pair could be as wide as W)
            factors = [f for t in terms for f in (t.kron or (t.A, t.B))]
            return effective(lambda w, *_: functional.add_delta(w, sum(t.delta() for t in terms)), w, *factors)
        folded = functional.fold([t.A for t in terms], [t.B for t in terms], [t.scale for t in terms])
        return effective(functional.effective_weight, w, *folded)

    return property(get, doc=f"``{slot}`` with the active adapters applied (W + scale·ΔW) while computed.")


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    """Every adapted layer of ``model`` with its qualified name, in registration order.

    As ``named_modules`` finds them (a module registered twice counts once, under its first name), but
    without walking into the adapters themselves: with many named adapters that walk is most of it.
    """
    out, seen = [], set()

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        adapted = isinstance(module, AdaptedLayer)
        if adapted:
            out.append((prefix, module))
        for name, child in module._modules.items():
            if child is not None and not (adapted and name == "lora"):
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return out
