"""merge / unmerge / disabled: explicit, model-wide merge state with bit-exact unmerge.

Merging folds each layer's active combination of adapters (``AdaptedLayer.folded``: one adapter as it
is, several as one rank-concatenated pair) into its weights. It is all or nothing: every active adapter
is checked to be finite before any weight is written, and if any layer fails (an overflow, a weight
with no in-place matrix view, any other error), the layers merged before it are unmerged bit-exactly
and the error names the layer. While merged, the active combination cannot change (``use``, ``delete``,
``hotswap`` and ``per_sample`` refuse), so unmerge folds the same pair again, to the bit.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import kernels
from .layers import AdaptedLayer, adapted_layers, dora
from .layers.routing import routes_any


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, AdaptedLayer]]:
    found = adapted_layers(model)
    if not found:
        raise ValueError(f"{what}: the model has no adapted layers; call peftlite.wrap(model, targets=...) first")
    return found


def _slots(layer: AdaptedLayer) -> list[str]:
    """The layer's adapted parameters that have an active adapter, in a fixed order."""
    return [s for s in dict.fromkeys(s for p in layer.adapters().values() for s in p) if layer.terms(s)]


def check_finite(name: str, layer: AdaptedLayer) -> None:
    """Raise ValueError if one of the layer's active adapters (or its scale) holds a non-finite value."""
    for adapter, weight in layer.adapter_state.active.items():
        for slot, pair in layer.pairs(adapter).items():
            _check_pair(name, adapter, slot, pair, weight)


def _check_pair(name: str, adapter: str, slot: str, pair, weight: float) -> None:
    scale = float(pair.effective_scale) * weight
    if not math.isfinite(scale):
        raise ValueError(f"cannot merge {name}: adapter {adapter!r} has scale {scale} for {slot!r}, not finite; "
                         "the model is unchanged")
    for t, label in ((pair.A, "A"), (pair.B, "B")):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = t.numel() - int(finite.sum())
            raise ValueError(
                f"cannot merge {name}: its adapter {label} for {slot!r} holds non-finite values ({bad} of "
                f"{t.numel()}, adapter {adapter!r}); the model is unchanged. Reload a good adapter file or lower "
                "the learning rate"
            )


@torch.no_grad()
def _matrix(layer: AdaptedLayer, slot: str):
    """The slot's in-place matrix view with its folded pair and scale, and for DoRA the per-row gain."""
    A, B, scale = layer.folded(slot)
    w = layer._parameters[slot].data
    term = layer.dora_term(slot)
    gain = None if term is None else dora.gain(w, A, B, scale, term.dora).detach().float()
    return kernels.as_matrix(w, A.detach(), B.detach(), gain=gain), scale, gain


def merge_layer(layer: AdaptedLayer) -> None:
    """Fold the active combination into the layer's weights in place, keeping exact-unmerge records."""
    st = layer.adapter_state
    done = []
    try:
        for slot in _slots(layer):
            (w2, a2, b2), scale, gain = _matrix(layer, slot)
            st.records[slot] = kernels.merge_(w2, a2, b2, scale, gain=gain)
            done.append(slot)
    except BaseException:
        for slot in done:  # put the slots merged so far back, bit-exactly
            _unmerge_slot(layer, slot)
        raise
    st.merged = True


@torch.no_grad()
def _unmerge_slot(layer: AdaptedLayer, slot: str) -> None:
    record = layer.adapter_state.records.get(slot)
    if record is None and layer.dora_term(slot) is not None:
        raise RuntimeError("unmerge: this DoRA layer's merged weights came from a state_dict, without the record "
                           "of its row gains; reload the unmerged weights and the adapter instead")
    A, B, scale = layer.folded(slot)
    w2, a2, b2 = kernels.as_matrix(layer._parameters[slot].data, A.detach(), B.detach())
    kernels.unmerge_(w2, a2, b2, scale, record)
    layer.adapter_state.records.pop(slot, None)


def unmerge_layer(layer: AdaptedLayer, name: str = "layer") -> None:
    """Take the adapter back out of the layer's weights; bit-exact when merged in this process."""
    st = layer.adapter_state
    for slot in _slots(layer):
        if slot not in st.records:
            warnings.warn(f"{name}: its merged state came from a state_dict, so unmerge subtracts ΔW and may "
                          "differ from the original weights in the last bit", stacklevel=3)
        _unmerge_slot(layer, slot)
    st.merged = False


def merge_all(layers: list[tuple[str, AdaptedLayer]]) -> None:
    """Merge each layer, all or nothing: on any error the merged ones are unmerged and the error names the layer.

    Raises:
        ValueError: a non-finite adapter (before anything is written) or a merged value that overflows.
        Any other error from a layer, re-raised as the same type with the layer's name prefixed.
    """
    for name, layer in layers:
        check_finite(name, layer)
    done: list[tuple[str, AdaptedLayer]] = []
    name = ""
    try:
        for name, layer in layers:
            merge_layer(layer)
            done.append((name, layer))
    except BaseException as e:  # KeyboardInterrupt too: no half-merged model
        for done_name, layer in reversed(done):
            unmerge_layer(layer, done_name)
        if isinstance(e, kernels.NonFiniteMergeError):
            raise ValueError(f"cannot merge {name}: {e}") from None
        if not isinstance(e, Exception):
            raise
        raise _named(e, f"cannot merge {name} (every layer is unmerged again)") from e


def _named(error: Exception, prefix: str) -> Exception:
    """The same kind of error with ``prefix`` in front of its message (a RuntimeError if it can't be rebuilt)."""
    try:
        return type(error)(f"{prefix}: {error}")
    except Exception:
        return RuntimeError(f"{prefix}: {type(error).__name__}: {error}")


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, so the forward costs what the base costs.

    All or nothing: adapters are checked to be finite before any weight is written, and a layer that
    fails (a merge that would overflow the weight's dtype, or any other error) puts every weight back
    bit-exactly and raises with the layer's name. Merging a merged model warns and does nothing.

    Raises:
        ValueError: non-finite adapters or merged weights (the model is unchanged), or no adapters.
        RuntimeError: called inside ``peftlite.disabled(model)``.
    """
    found = _require_layers(model, "merge")
    if any(not m.adapter_state.enabled for _, m in found):
        raise RuntimeError("merge inside peftlite.disabled(model) would change the base model; merge after the block")
    if routes_any(m for _, m in found):
        raise RuntimeError("merge inside peftlite.per_sample: every row uses its own adapter there, so there is no "
                           "one weight to merge; merge after the block")
    todo = [(n, m) for n, m in found if not m.adapter_state.merged]
    if not todo:
        warnings.warn("merge: the model is already merged; nothing to do", stacklevel=2)
        return model
    merge_all(todo)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every adapter back out of its base weight, restoring the weights bit-exactly.

    Unmerging an unmerged model warns and does nothing.
    """
    todo = [(n, m) for n, m in _require_layers(model, "unmerge") if m.adapter_state.merged]
    if not todo:
        warnings.warn("unmerge: the model is not merged; nothing to do", stacklevel=2)
        return model
    for name, layer in todo:
        unmerge_layer(layer, name)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters off inside the block (a merged model is unmerged, then re-merged).

    New heads stay in place: only the low-rank adapters are turned off.
    """
    found = _require_layers(model, "disabled")
    merged = [(n, m) for n, m in found if m.adapter_state.merged]
    for name, layer in merged:
        unmerge_layer(layer, name)
    previous = [m.adapter_state.enabled for _, m in found]
    for _, layer in found:
        layer.adapter_state.enabled = False
    try:
        yield model
    finally:
        for (_, layer), was in zip(found, previous, strict=True):
            layer.adapter_state.enabled = was
        for _, layer in merged:
            merge_layer(layer)
