"""The table of the layer types peftlite adapts, and attaching adapters to (and detaching them from) a module.

``KINDS`` maps each base type to its adapted class:

    nn.Linear              -> LoraLinear               (linear.py)
    nn.Conv2d              -> LoraConv2d               (conv.py)
    nn.MultiheadAttention  -> LoraMultiheadAttention   (attention.py)

A subclass of one of these (timm's ``Conv2dSame``, torch's ``NonDynamicallyQuantizableLinear``) gets a
class derived at run time (``adapted_class``, by ``derived_class``, which makes every run-time class):

- if it keeps the base forward, ``Lora<Class>(LoraConv2d, Class)``: peftlite's forward;
- if it has its own forward that reads the weight (``Conv2dSame`` pads, then calls ``F.conv2d`` with
  ``self.weight``), ``Lora<Class>(AdaptedLayer, Class)`` with the effective-weight property: its own
  forward sees ``W + scale·ΔW``;
- if its own forward never reads the weight, it is refused: its semantics could not be kept.

To adapt a new layer type, write its ``Lora<Type>`` class beside the others and add a row to ``KINDS``.

Tied weights (an adapted weight that another module shares, as GPT-2's ``lm_head`` shares the input
embedding's) are found here (``shared_weights``); ``untie`` / ``retie`` give a layer its own copy for the
length of a merge (``peftlite.merge(model, untie=True)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import functional
from ..functional import ConvGeometry
from .attention import PROJECTIONS, LeanMultiheadAttention, LoraMultiheadAttention, projection_slots
from .base import DEFAULT_ADAPTER, AdaptedLayer, LayerState, LowRank, effective_weight_property
from .conv import LoraConv2d
from .linear import LeanLinear, LoraLinear
from .loha import LowHadamard
from .lokr import LowKronecker
from .spec import AdapterSpec


@dataclass(frozen=True)
class Kind:
    """One row of the table: a base type and how peftlite adapts it."""

    name: str  # "linear", "conv2d", "mha": written into adapter files
    base: type
    adapted: type  # the literal adapted class
    slots: Callable[[nn.Module], tuple[str, ...]]  # the parameters that get adapters
    properties: tuple[str, ...]  # attributes the adapted class turns into effective-weight properties
    stock: tuple[str, ...]  # methods a subclass must not override to use the adapted class's forward
    geometry: Callable[[nn.Module], dict]  # what fixes the weight's meaning, as a file entry writes it
    routable: bool  # can ``per_sample`` give each batch row its own adapter (a weight not used as a whole)?


def _conv_geometry(m: nn.Module) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ConvGeometry.of(m)).items()}


KINDS: dict[type, Kind] = {
    nn.MultiheadAttention: Kind(
        "mha", nn.MultiheadAttention, LoraMultiheadAttention, projection_slots, PROJECTIONS, ("forward",),
        lambda m: {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "kdim": m.kdim, "vdim": m.vdim}, False),
    nn.Linear: Kind("linear", nn.Linear, LoraLinear, lambda m: ("weight",), ("weight",), ("forward",),
                    lambda m: {"in_features": m.in_features, "out_features": m.out_features}, True),
    nn.Conv2d: Kind("conv2d", nn.Conv2d, LoraConv2d, lambda m: ("weight",), ("weight",),
                    ("forward", "_conv_forward"), _conv_geometry, True),
}
SUPPORTED = tuple(KINDS)
# AdapterSpec.kind -> its pair class
PAIRS: dict[str, type[LowRank]] = {"lora": LowRank, "loha": LowHadamard, "lokr": LowKronecker}
SUPPORTED_NAMES = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED)
_RESERVED = ("lora", "adapter_state", "geometry")  # instance attributes an adapted layer adds


def kind_of(module: nn.Module) -> Kind | None:
    """The table row for a module (an adapted one included), or None for a type peftlite cannot adapt."""
    for base, kind in KINDS.items():
        if isinstance(module, base):
            return kind
    return None


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


_MIXED: dict[tuple[type, type], type] = {}


# wrap's lean classes for frozen stock modules it does not adapt (each names its stock class as plain_class)
LEAN = {nn.MultiheadAttention: LeanMultiheadAttention, nn.Linear: LeanLinear}


def make_lean(module: nn.Module) -> None:
    """Give a stock module (exactly ``nn.MultiheadAttention`` or ``nn.Linear``) wrap's lean training forward."""
    lean = LEAN.get(type(module))
    if lean is not None:
        module.__class__ = lean


def make_plain(module: nn.Module) -> None:
    """Undo ``make_lean`` (``unwrap``, and before the module gets adapters of its own)."""
    if type(module) in LEAN.values():
        module.__class__ = type(module).plain_class


def plain_type(module: nn.Module) -> type:
    """The module's class before wrap: an adapted layer's base class, a lean class's stock one."""
    if isinstance(module, AdaptedLayer):
        return type(module).base_class
    return type(module).plain_class if type(module) in LEAN.values() else type(module)


def derived_class(mixin: type, cls: type, prefix: str, **namespace: object) -> type:
    """The class ``<prefix><Class>(mixin, cls)``, derived at run time once per ``(mixin, cls)`` and cached.

    The one place peftlite makes classes at run time: adapted classes for subclasses of the table's types
    (``adapted_class``), frozen BatchNorms (``batchnorm.py``) and checkpointed blocks
    (``tuning/recomputation.py``). Each adds behaviour to a class peftlite does not own by swapping one
    instance's ``__class__``: the state_dict keys stay, and setting ``__class__`` back to ``cls`` undoes
    it. ``namespace`` holds extra class attributes (the base class, for undoing); it must depend on
    ``(mixin, cls)`` only, since the class is made once.
    """
    key = (mixin, cls)
    if key not in _MIXED:
        name = f"{prefix}{cls.__name__}"
        _MIXED[key] = type(name, (mixin, cls), {"__module__": mixin.__module__, "__qualname__": name, **namespace})
    return _MIXED[key]


def adapted_class(cls: type, kind: Kind) -> type:
    """The adapted class for ``cls``: the literal one for the base type, a derived one for a subclass (cached).

    Raises:
        TypeError: ``cls`` has its own forward that never reads the adapted weight, so its semantics
            could not be kept.
    """
    if cls is kind.base or LEAN.get(kind.base) is cls:  # wrap's lean class is the stock module
        return kind.adapted
    if all(getattr(cls, m) is getattr(kind.base, m) for m in kind.stock):
        return derived_class(kind.adapted, cls, "Lora", base_class=cls)
    if _reads(cls, kind):
        properties = {p: effective_weight_property(p) for p in kind.properties}
        return derived_class(AdaptedLayer, cls, "Lora", base_class=cls, adapter_kind=kind.name, **properties)
    raise TypeError(
        f"{cls.__module__}.{cls.__name__} overrides forward and never reads {'/'.join(kind.properties)}, "
        "so peftlite cannot adapt it without changing what it computes; target its inner layers instead, "
        "or exclude it from targets"
    )


def check_adaptable(name: str, module: nn.Module, adapter: str = DEFAULT_ADAPTER) -> Kind:
    """The module's kind, or an error that says why it cannot take adapter ``adapter``; changes nothing.

    Raises:
        ValueError: the layer already has an adapter of that name.
        TypeError: a type peftlite cannot adapt, or a module whose semantics could not be kept.
    """
    if isinstance(module, AdaptedLayer):
        if adapter in module.lora:
            raise ValueError(f"module {name!r} already has an adapter named {adapter!r}; give the new one another "
                             f"name= (its adapters: {', '.join(module.lora)}), or peftlite.delete it first")
        return kind_of(module)
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
    taken = [a for a in _RESERVED if a in module.__dict__ or a in module._modules or hasattr(type(module), a)]
    if taken:
        raise TypeError(f"module {name!r} ({type(module).__name__}) already has an attribute {taken[0]!r}, "
                        "which an adapted layer needs; rename it, or leave the module out of targets")
    adapted_class(type(module), kind)  # raises when the forward semantics could not be kept
    return kind


def adapter_shapes(module: nn.Module, rank: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """``{slot: (A shape, B shape)}`` that adapting ``module`` with ``rank`` creates."""
    kind = kind_of(module)
    out = {}
    for slot in kind.slots(module):
        w = module._parameters[slot]
        out[slot] = ((rank, w[0].numel()), (w.shape[0], rank))
    return out


def _new_pair(module: nn.Module, slot: str, spec: AdapterSpec, device=None) -> LowRank:
    """A fresh pair of ``spec``'s kind for ``module``'s parameter ``slot`` (fp32 or wider), on ``device``
    (default: the weight's)."""
    w = module._parameters[slot]
    fan_in, fan_out = w[0].numel(), w.shape[0]
    kernel = w[0, 0].numel() if w.dim() > 2 else 1  # kh·kw of a conv: LoKr splits the channels, not the kernel
    dtype = torch.promote_types(w.dtype, torch.float32)  # adapters keep fp32 master precision
    return PAIRS[spec.kind](spec, fan_in, fan_out, kernel=kernel, device=device or w.device, dtype=dtype)


def pair_shapes(module: nn.Module, spec: AdapterSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{slot: {parameter: shape}}`` of the pairs ``attach`` would create, built on the meta device.

    Raises:
        ValueError: a spec that does not fit the module (a LoKr split that does not divide its dimensions).
    """
    out = {}
    for slot in kind_of(module).slots(module):
        pair = _new_pair(module, slot, spec, device="meta")
        out[slot] = {name: tuple(p.shape) for name, p in pair.named_parameters()}
    return out


def attach(module: nn.Module, kind: Kind, spec: AdapterSpec, *, adapter: str = DEFAULT_ADAPTER) -> None:
    """Add adapter ``adapter`` to ``module`` with fresh pairs (B = 0, so outputs are unchanged; a DoRA
    magnitude starts at the rows' norms ‖W_i‖ for the same reason).

    An unadapted module first becomes its adapted class, with nothing active; the caller activates.
    """
    pairs = {}
    for slot in kind.slots(module):
        w = module._parameters[slot]
        pairs[slot] = _new_pair(module, slot, spec)
        if spec.variant == "dora":
            with torch.no_grad():
                pairs[slot].magnitude.copy_(functional.dora_norms(w.detach(), pairs[slot].A, pairs[slot].B, 0.0))
    entry = pairs["weight"] if list(pairs) == ["weight"] else nn.ModuleDict(pairs)
    if isinstance(module, AdaptedLayer):
        module.lora[adapter] = entry
        return
    make_plain(module)
    module.__class__ = adapted_class(type(module), kind)
    module.lora = nn.ModuleDict({adapter: entry})
    module.adapter_state = LayerState(active={})
    if kind.name == "conv2d":
        module.geometry = ConvGeometry.of(module)


def remove(module: AdaptedLayer, adapter: str) -> None:
    """Drop one adapter from the layer; the last one gives the module its own class back."""
    del module.lora[adapter]
    module.adapter_state.active.pop(adapter, None)
    if not len(module.lora):
        detach(module)


def detach(module: AdaptedLayer) -> None:
    """Give the module back its own class, dropping the adapters (the caller merged or unmerged first)."""
    del module.lora
    del module.adapter_state
    module.__dict__.pop("geometry", None)
    module.__class__ = type(module).base_class


# ---- tied weights --------------------------------------------------------------------------------

def _span(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(storage address, first byte, end byte)`` that ``t`` covers, or None where it has no storage to
    compare (meta tensors, tensor subclasses such as DTensor): those compare by identity only."""
    if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type == "meta" or t.numel() == 0:
        return None
    size = t.element_size()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return t.untyped_storage().data_ptr(), t.storage_offset() * size, (t.storage_offset() + last + 1) * size


def _overlaps(a: tuple[int, int, int] | None, b: tuple[int, int, int] | None) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def shared_weights(model: nn.Module, layers: list[tuple[str, AdaptedLayer]]) -> dict[tuple[str, str], list[str]]:
    """The adapted weights that another tensor of ``model`` shares (tied weights), and who shares them.

    A weight is shared when another parameter or buffer, registered anywhere in ``model``, is the same
    tensor or overlaps its storage: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``, T5's is
    ``shared.weight``, BERT's MLM decoder's is the word embeddings'. The same module registered under
    several names (an alias, as in timm's CoaT) is not a tie: it is one layer.

    Ties do not matter unmerged (the layer adds its adapter to its own output; the other module keeps
    W), but merging writes ``W + scale·ΔW`` into the one tensor, so the other module would change too.

    Returns:
        ``{(layer name, slot): [qualified names of the other tensors]}``, in registration order; empty
        when nothing is shared.
    """
    wanted = {}  # (layer name, slot) -> (layer, weight, span)
    by_tensor: dict[int, list[tuple[str, str]]] = {}  # id of a weight -> its keys
    by_storage: dict[int, list[tuple[str, str]]] = {}  # storage address -> keys of weights in it
    for name, layer in layers:
        for slot in dict.fromkeys(s for pairs in layer.adapters().values() for s in pairs):
            w = layer._parameters.get(slot)
            if w is not None:
                key, span = (name, slot), _span(w)
                wanted[key] = (layer, w, span)
                by_tensor.setdefault(id(w), []).append(key)
                if span is not None:
                    by_storage.setdefault(span[0], []).append(key)
    found: dict[tuple[str, str], list[str]] = {}
    for owner, module in model.named_modules(remove_duplicate=False) if wanted else ():
        if isinstance(module, LowRank):
            continue
        for tname, t in (*module._parameters.items(), *module._buffers.items()):
            span = None if t is None else _span(t)
            candidates = [] if t is None else by_tensor.get(id(t), []) + by_storage.get(span and span[0], [])
            for key in dict.fromkeys(candidates):
                layer, w, wspan = wanted[key]
                if (module is layer and tname == key[1]) or not (t is w or _overlaps(span, wspan)):
                    continue
                names = found.setdefault(key, [])
                qualified = f"{owner}.{tname}" if owner else tname
                if qualified not in names:
                    names.append(qualified)
    return {key: found[key] for key in wanted if key in found}


def untie(layer: AdaptedLayer, slot: str) -> None:
    """Give ``layer`` its own copy of its shared weight ``slot`` (same values, strides, requires_grad);
    the shared parameter is kept in ``adapter_state.untied`` for ``retie``."""
    shared = layer._parameters[slot]
    copy = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    layer._parameters[slot] = copy
    layer.adapter_state.untied[slot] = shared


def retie(layer: AdaptedLayer) -> None:
    """Put back the shared parameters ``untie`` replaced (the layer's copies are dropped)."""
    for slot, shared in layer.adapter_state.untied.items():
        layer._parameters[slot] = shared
    layer.adapter_state.untied.clear()
