"""Several named adapters on one base: list them, choose which compute, delete one, route a batch per row.

    peftlite.adapters(model)                    # ["default", "a", ...], in creation order
    peftlite.use(model, "a")                    # one; ["a", "b"] summed; {"a": 0.7, "b": 0.3} weighted; None: base
    peftlite.delete(model, "b")
    with peftlite.per_sample(model, ["a", "b", None, "a"]):   # one entry per batch row
        y = model(x)

``use`` decides what the forward computes and what trains: the active adapters' parameters require grad,
every other adapter's do not (heads and ``trainable=`` tensors keep theirs). It overrides an earlier
``freeze``/``unfreeze`` of adapter parameters. Inside ``per_sample`` the route alone picks each row's
adapter, whatever ``use`` says; every routed adapter that requires grad gets its gradient, so to train
several in one batch, ``use`` them all (``use(model, ["a", "b"])``) and route.

While the model is merged, ``use``, ``delete`` and ``per_sample`` refuse (unmerge first); ``merge``
refuses inside ``per_sample``.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .layers import adapted_layers, registry
from .layers.routing import ROUTE, Routed
from .state import WrapState, activate, refuse_busy, remove, wrap_state


def _state(model: nn.Module, what: str) -> WrapState:
    state = wrap_state(model)
    if state is None or not state.adapters:
        raise ValueError(f"{what}: the model has no adapters; call peftlite.wrap(model, targets=..., name=...) first")
    return state


def known(state: WrapState, name: object, what: str) -> str:
    """``name`` if the model has an adapter of that name, else KeyError listing the known ones."""
    if name not in state.adapters:
        raise KeyError(f"{what}: no adapter named {name!r}; the model has {', '.join(map(repr, state.adapters))}")
    return name


def kind_of_adapter(model: nn.Module, name: str) -> str:
    """Adapter ``name``'s kind (``AdapterSpec.kind``: "lora", "loha", "lokr"), read from its pairs."""
    return next((p.kind for _, m in adapted_layers(model) if name in m.lora for p in m.pairs(name).values()), "lora")


def is_dora(model: nn.Module, name: str) -> bool:
    """Is adapter ``name`` a DoRA adapter (on any layer)?"""
    return any(p.variant == "dora" for _, m in adapted_layers(model) if name in m.lora
               for p in m.pairs(name).values())


def adapters(model: nn.Module) -> list[str]:
    """The model's adapter names, in creation order (empty for a model without adapters)."""
    state = wrap_state(model)
    return list(state.adapters) if state is not None else []


def active(model: nn.Module) -> dict[str, float]:
    """The active combination: ``{name: weight}`` (empty: the base model)."""
    state = wrap_state(model)
    return dict(state.active) if state is not None else {}


def _combination(state: WrapState, spec, what: str) -> dict[str, float]:
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {known(state, spec, what): 1.0}
    if isinstance(spec, Mapping):
        out = {}
        for name, weight in spec.items():
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not torch.isfinite(
                    torch.tensor(float(weight))):
                raise ValueError(f"{what}: weight {weight!r} for {name!r} is not a finite number")
            out[known(state, name, what)] = float(weight)
        return out
    if isinstance(spec, Sequence):
        names = [known(state, n, what) for n in spec]
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: {list(spec)} names an adapter twice")
        return dict.fromkeys(names, 1.0)
    raise TypeError(f"{what}: give a name, a list of names (summed), a dict name -> weight, or None (the base); "
                    f"got {type(spec).__name__}")


def use(model: nn.Module, spec) -> nn.Module:
    """Choose what the forward computes: one adapter, several summed or weighted, or None (the base).

    The active adapters' parameters require grad and every other adapter's do not (heads and
    ``trainable=`` tensors keep theirs). After ``torch.compile``, a change of combination recompiles
    (the forward branches on it), never silently reusing the old graph.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
        AdapterStateError: the model is merged, or inside ``per_sample``.
    """
    state = _state(model, "use")
    combination = _combination(state, spec, "use")
    dora = [n for n in combination if is_dora(model, n)]
    if dora and (len(combination) > 1 or combination[dora[0]] != 1.0):
        raise ValueError(f"use: {dora[0]!r} is a DoRA adapter, whose magnitudes do not add: use it alone, at "
                         f"weight 1 (got {combination})")
    refuse_busy(model, "use")
    activate(model, state, combination)
    return model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer; a layer left without adapters gets its own class back.

    Raises:
        KeyError: an unknown name. AdapterStateError: the model is merged, or inside ``per_sample``.
    """
    state = _state(model, "delete")
    known(state, name, "delete")
    refuse_busy(model, "delete")
    remove(model, state, name)
    return model


def _route(model: nn.Module, state: WrapState, rows: Sequence) -> dict[int, Routed]:
    """Each adapted layer's share of the route: its adapter number per row (-1: base).

    Layers that hold the same adapters, in the same order and on the same device, get the same index
    tensors (read only): a deep model builds them once per route, not once per layer.
    """
    for name in rows:
        if name is not None:
            known(state, name, "per_sample")
    shares: dict[tuple, tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = {}
    out = {}
    for lname, layer in adapted_layers(model):
        names = tuple(layer.lora)
        key = (names, next(iter(layer.pairs(names[0]).values())).A.device)  # where the adapters live
        if key not in shares:
            shares[key] = _share(key[0], rows, key[1])
        slots, used, packed = shares[key]
        if used and not registry.kind_of(layer).routable:
            raise ValueError(
                f"per_sample: {lname} ({type(layer).__name__}) computes with its weight as a whole, so one batch "
                f"cannot use a different adapter per row there; route adapters that do not adapt it, or run "
                "the rows in separate batches with peftlite.use")
        out[id(layer)] = Routed(lname, slots, bool(used), used, packed)
    return out


def _share(names: tuple[str, ...], rows: Sequence, device: torch.device):
    """``(slots, used, packed)`` of ``Routed`` for a layer holding adapters ``names`` (in that order)."""
    local = {n: i for i, n in enumerate(names)}
    numbers = [-1 if n is None else local.get(n, -1) for n in rows]
    used = tuple(sorted({k for k in numbers if k >= 0}))
    position = {k: i for i, k in enumerate(used)}
    slots = torch.tensor(numbers, dtype=torch.int64, device=device)
    packed = torch.tensor([position.get(k, -1) for k in numbers], dtype=torch.int64, device=device)
    return slots, used, packed


@contextlib.contextmanager
def per_sample(model: nn.Module, rows: Sequence) -> Iterator[nn.Module]:
    """Inside the block, batch row n of every forward uses adapter ``rows[n]`` (None: the base).

    One batched pass per layer (no loop over adapters or rows), for Linear and every Conv2d geometry;
    the result equals running each row through its own adapter. A layer that lacks a row's adapter
    computes the base for that row, as ``use`` would. The route is per thread (a context variable), so
    threads serving different mixed batches on one model each get their own. Under ``torch.compile`` a
    new route is a new index tensor: no graph break, no recompilation.

    Raises:
        KeyError: an unknown name. ValueError: a layer whose weight is read directly (attention) would
        be routed. AdapterStateError: the model is merged. A forward whose batch size differs from
        ``len(rows)`` raises ValueError.
    """
    state = _state(model, "per_sample")
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"per_sample: give one adapter name (or None) per batch row, as a list; got {rows!r}")
    refuse_busy(model, "per_sample", routed=False)
    route = _route(model, state, rows)
    outer = ROUTE.get()
    token = ROUTE.set({**(outer or {}), **route})
    try:
        yield model
    finally:
        ROUTE.reset(token)

