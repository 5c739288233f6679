"""The model's adapter state in one place: which named adapters it has, which are active, and the one refusal.

    WrapState     what wrap did to the model as a whole, kept on the root module as ``model._peftlite``;
                  its ``adapters`` and ``active`` change only through the functions below
    add           a name joins the model's adapters (its layers' pairs are attached by the caller, through
                  ``layers.registry``), optionally becoming the active set
    remove        a name leaves: its pairs are detached from every layer, and it leaves the active set
    activate      ``state.active`` made what every layer computes (``LayerState.active``) and what trains
    refuse_busy   the one ``AdapterStateError`` for a call the adapters' state forbids: merged, inside
                  ``peftlite.per_sample`` or inside ``peftlite.disabled``

A layer's own adapters are the keys of ``layer.lora``: ``add`` and ``remove`` keep ``state.adapters`` (the
model's, in creation order) and them in step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .layers import AdapterStateError, adapted_layers, principal, registry
from .layers.routing import routes_any


@dataclass
class WrapState:
    """What wrap did to the model as a whole, kept on the root module as ``model._peftlite``."""

    heads: list[str] = field(default_factory=list)  # module names replaced by new modules
    trainable: list[str] = field(default_factory=list)  # module or tensor names trained in full
    train_bn: bool = False
    requires_grad: dict[str, bool] = field(default_factory=dict)  # each base param's flag before wrap
    adapters: list[str] = field(default_factory=list)  # adapter names, in creation order
    active: dict[str, float] = field(default_factory=dict)  # name -> weight: what the forward computes
    hotswap: dict | None = None  # {"max_rank": R, "layers": [...]} once prepared for hot-swapping


def wrap_state(model: nn.Module) -> WrapState | None:
    """The model's WrapState, or None for a model peftlite has not wrapped."""
    return model.__dict__.get("_peftlite")


def adapter_tensors(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """The parameters of the adapters ``names`` (all when None), by qualified name (``conv1.lora.default.A``)."""
    out = {}
    for name, layer in adapted_layers(model):
        for adapter, pairs in layer.lora.items():
            if (names is None or adapter in names) and not all(p.off for p in layer.pairs(adapter).values()):
                prefix = f"{name}.lora.{adapter}" if name else f"lora.{adapter}"
                out.update(pairs.named_parameters(prefix=prefix))
    return out


def apply_active(model: nn.Module, state: WrapState) -> None:
    """Give every adapted layer the model's active combination (the adapters it has of it)."""
    for _, layer in adapted_layers(model):
        layer.adapter_state.active = {n: w for n, w in state.active.items() if n in layer.lora}


def apply_adapter_grads(model: nn.Module, state: WrapState) -> None:
    """requires_grad of adapter parameters only: True for the active adapters, False for the others."""
    active = set(adapter_tensors(model, list(state.active)))
    for name, p in adapter_tensors(model).items():
        p.requires_grad_(name in active)


def activate(model: nn.Module, state: WrapState, active: Mapping[str, float] | None = None) -> None:
    """Make ``active`` (default: ``state.active`` as it is) the active set: what every layer computes and
    what trains."""
    if active is not None:
        state.active = dict(active)
    apply_active(model, state)
    apply_adapter_grads(model, state)


def add(state: WrapState, name: str, make_active: bool = False) -> None:
    """``name`` joins the model's adapters (a no-op for a name it has); with ``make_active``, the only active one.
    The caller has attached its pairs and applies the active set (``activate``, or wrap's freezing)."""
    if name not in state.adapters:
        state.adapters.append(name)
        if make_active:
            state.active = {name: 1.0}


def remove(model: nn.Module, state: WrapState, name: str) -> None:
    """Detach adapter ``name`` from every layer (a layer left without adapters gets its own class back), drop it
    from the model's adapters and the active set, and apply the rest. Where ``name`` started from a principal
    init (PiSSA, OLoRA), the base weights get their original values back first, bit-exactly."""
    owned = [(n, m) for n, m in adapted_layers(model) if name in m.lora]
    residuals = [(n, m) for n, m in owned if m.adapter_state.residual and m.adapter_state.residual.owner == name]
    principal.check_restorable(residuals, f"delete({name!r})")
    for lname, layer in owned:
        if (lname, layer) in residuals:  # the base gets its original weights back, bit-exactly
            principal.restore(layer, lname)
        registry.remove(layer, name)
    if name in state.adapters:
        state.adapters.remove(name)
    state.active.pop(name, None)
    activate(model, state)


def refuse_busy(model: nn.Module, what: str, *, merged: bool = True, routed: bool = True, disabled: bool = False,
                adapter: str | None = None) -> None:
    """Raise ``AdapterStateError`` when the model is merged (``merged``; with ``adapter``: when that adapter is
    merged into the weights), inside ``peftlite.per_sample`` (``routed``) or inside ``peftlite.disabled``
    (``disabled``)."""
    found = adapted_layers(model)
    held = [n for n, m in found if merged and m.adapter_state.merged
            and (adapter is None or adapter in m.adapter_state.active)]  # layers whose weights hold the adapters
    if held and adapter is not None:
        raise AdapterStateError(f"{what}: adapter {adapter!r} is merged into the weights ({held[0]}, ...); call "
                                "peftlite.unmerge(model) first")
    if held:
        raise AdapterStateError(f"{what}: the model is merged ({held[0]}, ...), so its weights hold the active "
                                "adapters; call peftlite.unmerge(model) first")
    if routed and routes_any(m for _, m in found):
        raise AdapterStateError(f"{what}: inside peftlite.per_sample every row uses the adapter its route picks; "
                                f"call {what} after the block")
    if disabled and any(not m.adapter_state.enabled for _, m in found):
        raise AdapterStateError(f"{what}: inside peftlite.disabled(model) the model is its base; call {what} after "
                                "the block")
