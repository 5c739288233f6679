"""merge / unmerge / disabled: explicit, model-wide merge state with bit-exact unmerge."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import kernels
from .layers import Adapted


def adapted_layers(model: nn.Module) -> list[tuple[str, Adapted]]:
    """Every adapted module of ``model``, with its qualified name, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Adapted)]


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, Adapted]]:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no adapted layers; call peftlite.wrap(model, targets=...) first")
    return layers


def _check_finite(name: str, layer: Adapted) -> None:
    for slot, pair in layer.lora_pairs().items():
        if not math.isfinite(pair.scale):
            raise ValueError(f"cannot merge {name}: adapter scale {pair.scale} is not finite; the model is unchanged")
        for t, label in ((pair.A, "A"), (pair.B, "B")):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"cannot merge {name}: its adapter {label} for {slot!r} holds non-finite values "
                    f"({int((~torch.isfinite(t)).sum())} of {t.numel()}); the model is unchanged. "
                    "Reload a good adapter file or lower the learning rate"
                )


def merge_layer(layer: Adapted) -> None:
    """Fold the active adapter into the layer's weights in place, keeping an exact-unmerge record."""
    st = layer._lora_state
    done = []
    try:
        for slot, pair in layer.lora_pairs().items():
            w2, a2, b2 = kernels.as_matrix(layer._parameters[slot].data, pair.A.detach(), pair.B.detach())
            st.records[slot] = kernels.merge_(w2, a2, b2, pair.scale)
            done.append(slot)
    except Exception:
        for slot in done:  # put the slots merged so far back, bit-exactly
            _unmerge_slot(layer, slot)
        raise
    st.merged = True


def _unmerge_slot(layer: Adapted, slot: str) -> None:
    pair = layer.lora_pairs()[slot]
    w2, a2, b2 = kernels.as_matrix(layer._parameters[slot].data, pair.A.detach(), pair.B.detach())
    kernels.unmerge_(w2, a2, b2, pair.scale, layer._lora_state.records.pop(slot, None))


def unmerge_layer(layer: Adapted, name: str = "layer") -> None:
    """Take the adapter back out of the layer's weights; bit-exact when merged in this process."""
    st = layer._lora_state
    for slot in layer.lora_pairs():
        if slot not in st.records:
            warnings.warn(f"{name}: its merged state came from a state_dict, so unmerge subtracts ΔW and may "
                          "differ from the original weights in the last bit", stacklevel=3)
        _unmerge_slot(layer, slot)
    st.merged = False


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, so the forward costs what the base costs.

    Every delta is checked to be finite before any weight is written; a merge that would overflow the
    weight's dtype puts every weight back bit-exactly and raises. Merging a merged model warns and does
    nothing.

    Raises:
        ValueError: non-finite adapters or merged weights (the model is unchanged), or no adapters.
        RuntimeError: called inside ``peftlite.disabled(model)``.
    """
    layers = _require_layers(model, "merge")
    if any(not m._lora_state.enabled for _, m in layers):
        raise RuntimeError("merge inside peftlite.disabled(model) would change the base model; merge after the block")
    todo = [(n, m) for n, m in layers if not m._lora_state.merged]
    if not todo:
        warnings.warn("merge: the model is already merged; nothing to do", stacklevel=2)
        return model
    for name, layer in todo:
        _check_finite(name, layer)
    done = []
    try:
        for name, layer in todo:
            merge_layer(layer)
            done.append((name, layer))
    except kernels.NonFiniteMergeError as e:
        for done_name, layer in done:
            unmerge_layer(layer, done_name)
        raise ValueError(f"cannot merge {name}: {e}") from None
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every adapter back out of its base weight, restoring the weights bit-exactly.

    Unmerging an unmerged model warns and does nothing.
    """
    layers = _require_layers(model, "unmerge")
    todo = [(n, m) for n, m in layers if m._lora_state.merged]
    if not todo:
        warnings.warn("unmerge: the model is not merged; nothing to do", stacklevel=2)
        return model
    for name, layer in todo:
        unmerge_layer(layer, name)
    return model


def is_merged(model: nn.Module) -> bool:
    """True when every adapted layer of the model is merged."""
    layers = _require_layers(model, "is_merged")
    return all(m._lora_state.merged for _, m in layers)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters off inside the block (a merged model is unmerged, then re-merged).

    New heads stay in place: only the low-rank adapters are turned off.
    """
    layers = _require_layers(model, "disabled")
    merged = [(n, m) for n, m in layers if m._lora_state.merged]
    for name, layer in merged:
        unmerge_layer(layer, name)
    previous = [m._lora_state.enabled for _, m in layers]
    for _, layer in layers:
        layer._lora_state.enabled = False
    try:
        yield model
    finally:
        for (_, layer), was in zip(layers, previous):
            layer._lora_state.enabled = was
        for _, layer in merged:
            merge_layer(layer)
