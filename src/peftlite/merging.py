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
from functools import partial

import torch
from torch import nn

from . import kernels
from .layers import AdaptedLayer, adapted_layers, dora, registry
from .state import refuse_busy


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, AdaptedLayer]]:
    found = adapted_layers(model)
    if not found:
        raise ValueError(f"{what}: the model has no adapted layers; call peftlite.wrap(model, targets=...) first")
    return found


def _refuse_sharded(layers: list[tuple[str, AdaptedLayer]], what: str, model: nn.Module | None = None) -> None:
    """Raise RuntimeError, before anything is written, if a layer is sharded by FSDP2's ``fully_shard``.

    The merge kernels work on whole weights: a shard of W with shards of A and B is not a merge of W,
    and the gathered weights FSDP2 leaves on a module after an inference forward are temporaries (a
    write there is lost). So a layer with a DTensor parameter is refused, and with ``model``, every
    layer of a model that holds an ``FSDPModule``.
    """
    dtensor = getattr(torch.distributed, "tensor", None)  # there once imported: a DTensor exists only then
    fsdp = getattr(torch.distributed, "fsdp", None)
    if dtensor is None and fsdp is None:
        return
    managed = fsdp is not None and model is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules())
    for name, layer in layers:
        sharded = [n for n, p in layer.named_parameters() if dtensor is not None and isinstance(p, dtensor.DTensor)]
        if sharded or managed:
            what_is = f"its parameter {sharded[0]!r} is a DTensor" if sharded else "the model is an FSDPModule"
            raise RuntimeError(
                f"cannot {what} {name}: it is sharded by fully_shard ({what_is}) and merging works on whole "
                "weights; the model is unchanged. Merge after gathering: peftlite.save(model, path) on every "
                "rank, then peftlite.load the file into an unsharded model and merge that one")


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
    for label, t in pair.named_parameters(recurse=False):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = t.numel() - int(finite.sum())
            raise ValueError(
                f"cannot merge {name}: its adapter {label} for {slot!r} holds non-finite values ({bad} of "
                f"{t.numel()}, adapter {adapter!r}); the model is unchanged. Reload a good adapter file or lower "
                "the learning rate"
            )


def _has_rows(layer: AdaptedLayer, slot: str) -> bool:
    """Is an active adapter on ``slot`` of a kind merged by its ΔW's rows (LoKr), not by a pair?"""
    return any(t.kron is not None for t in layer.terms(slot))


def _rows(layer: AdaptedLayer, slot: str, transposed: bool) -> kernels.Rows:
    """ΔW's rows of the active adapters on ``slot`` (of Wᵀ when ``transposed``), in a fixed order: each
    adapter's own exact form (LoKr: ``kron_rows``; others: their pair), summed in activation order."""
    def low_rank(A, B, scale: float) -> kernels.Rows:  # scale·B A, or its transpose scale·Aᵀ Bᵀ
        A, B = A.detach(), B.detach()
        return kernels.pair_rows(B.t(), A.t(), scale) if transposed else kernels.pair_rows(A, B, scale)

    parts = []
    for adapter, weight in layer.adapter_state.active.items():
        pair = layer.pairs(adapter).get(slot)
        if pair is None:
            continue
        scale = float(pair.effective_scale) * weight
        if pair.kind == "lokr":  # (W1 ⊗ W2)ᵀ = W1ᵀ ⊗ W2ᵀ
            W1, W2 = (kernels.exact_product(f) for f in pair.factor_parts())
            parts.append(kernels.kron_rows(W1.t(), W2.t(), scale) if transposed else kernels.kron_rows(W1, W2, scale))
        else:
            parts.append(low_rank(pair.A, pair.B, scale))
    rest = layer.residual_term(slot)  # a principal init's part, added back while its adapter is not fully active
    if rest is not None:
        parts.append(low_rank(rest.A, rest.B, float(rest.scale)))
    return kernels.summed_rows(parts)


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
            if _has_rows(layer, slot):
                with torch.no_grad():
                    w2, rows = kernels.as_matrix_rows(layer._parameters[slot].data, partial(_rows, layer, slot))
                    st.records[slot] = kernels.merge_rows_(w2, rows)
            else:
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
    if _has_rows(layer, slot):
        w2, rows = kernels.as_matrix_rows(layer._parameters[slot].data, partial(_rows, layer, slot))
        kernels.unmerge_rows_(w2, rows, record)
    else:
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


def _refuse_meta(layers: list[tuple[str, AdaptedLayer]]) -> None:
    """Raise RuntimeError, before anything is written, if a layer's weights are on the meta device (no values)."""
    for name, layer in layers:
        for slot in _slots(layer):
            if layer._parameters[slot].is_meta:
                raise RuntimeError(
                    f"cannot merge {name}: its {slot!r} is on the meta device and holds no values; the model is "
                    "unchanged. Materialise the model first: model.to_empty(device=...), load its base weights "
                    "and peftlite.load the adapter, then merge")


def check_unmergeable(layers: list[tuple[str, AdaptedLayer]], what: str = "unmerge") -> None:
    """Raise RuntimeError, before any weight is written, if a merged layer cannot be unmerged exactly: it
    was moved to another device or dtype while merged (``model.double()``), so its merge records no longer
    describe its weights."""
    for name, layer in layers:
        for slot, record in layer.adapter_state.records.items():
            w = layer._parameters[slot]
            if w.dtype != record.dtype or w.device != record.device:
                raise RuntimeError(
                    f"{what} {name}: merged as {record.dtype} on {record.device}, but the weight is now {w.dtype} on "
                    f"{w.device} ({slot!r} moved while merged); the model is unchanged. Move it back "
                    f"(.to({record.dtype}) / .to({str(record.device)!r})) to unmerge exactly, and unmerge before "
                    ".to(...) next time")


def merge_all(layers: list[tuple[str, AdaptedLayer]]) -> None:
    """Merge each layer, all or nothing: on any error the merged ones are unmerged and the error names the layer.

    Raises:
        ValueError: a non-finite adapter (before anything is written) or a merged value that overflows.
        RuntimeError: a layer's weights are sharded (FSDP2), before anything is written.
        Any other error from a layer, re-raised as the same type with the layer's name prefixed.
    """
    _refuse_sharded(layers, "merge")
    _refuse_meta(layers)
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


def untie_shared(model: nn.Module, layers: list[tuple[str, AdaptedLayer]], untie: bool, call: str
                 ) -> list[AdaptedLayer]:
    """Before a merge: refuse tied weights, or with ``untie`` give each its own copy (the layers untied).

    A tied weight (``registry.shared_weights``: GPT-2's, T5's and BERT-MLM's output Linear shares the
    input embedding's tensor) cannot take ``W + scale·ΔW`` in place: the other module would change too.

    Raises:
        ValueError: a layer's weight is shared and ``untie`` is False (names both; nothing is changed).
    """
    shared = registry.shared_weights(model, layers)
    if shared and not untie:
        (name, slot), others = next(iter(shared.items()))
        more = f" ({len(shared) - 1} more tied weight(s) too)" if len(shared) > 1 else ""
        raise ValueError(
            f"cannot merge {name}: {name}.{slot} is shared with {', '.join(others)} (tied weights){more}, so "
            f"merging in place would change {others[0]} too; the model is unchanged. Call {call}(model, "
            f"untie=True) to merge into a copy of {name}.{slot} of its own, or leave {name} out of targets")
    by_name = dict(layers)
    for name, slot in shared:
        registry.untie(by_name[name], slot)
    return list({id(by_name[n]): by_name[n] for n, _ in shared}.values())


def merge(model: nn.Module, untie: bool = False) -> nn.Module:
    """Fold every adapter into its base weight, in place, so the forward costs what the base costs.

    All or nothing: adapters are checked to be finite before any weight is written, and a layer that
    fails (a merge that would overflow the weight's dtype, or any other error) puts every weight back
    bit-exactly and raises with the layer's name. Merging a merged model warns and does nothing.

    Tied weights (an output Linear sharing the input embedding's tensor, the transformers default for
    GPT-2, T5 and BERT-MLM) are refused: merging in place would change the embedding too. With
    ``untie=True`` such a layer merges into a copy of its own; the state_dict then holds the merged
    weight under the layer's key and the base weight under the other module's, and ``unmerge`` (exact)
    ties the layer to the shared tensor again. Unmerged, a tied layer needs nothing: it adds its adapter
    to its own output, and the embedding keeps W.

    Raises:
        ValueError: non-finite adapters or merged weights (the model is unchanged), no adapters, or a
            tied weight without ``untie=True``.
        AdapterStateError: called inside ``peftlite.disabled(model)`` or ``per_sample``.
        RuntimeError: on sharded weights (FSDP2's ``fully_shard``; the model is unchanged): merge an unsharded
            model that loaded the adapter.
    """
    found = _require_layers(model, "merge")
    refuse_busy(model, "merge", merged=False, disabled=True)
    todo = [(n, m) for n, m in found if not m.adapter_state.merged]
    if not todo:
        warnings.warn("merge: the model is already merged; nothing to do", stacklevel=2)
        return model
    _refuse_sharded(todo, "merge", model)
    untied = untie_shared(model, todo, untie, "peftlite.merge")
    try:
        merge_all(todo)
    except BaseException:
        for layer in untied:
            registry.retie(layer)
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every adapter back out of its base weight, restoring the weights bit-exactly.

    A layer merged with ``untie=True`` shares its tied tensor again (its copy is dropped). Unmerging an
    unmerged model warns and does nothing; a sharded one (FSDP2) is refused (RuntimeError).
    """
    todo = [(n, m) for n, m in _require_layers(model, "unmerge") if m.adapter_state.merged]
    if not todo:
        warnings.warn("unmerge: the model is not merged; nothing to do", stacklevel=2)
        return model
    _refuse_sharded(todo, "unmerge", model)
    check_unmergeable(todo)
    for name, layer in todo:
        unmerge_layer(layer, name)
        registry.retie(layer)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters off inside the block (a merged model is unmerged, then re-merged).

    New heads stay in place: only the low-rank adapters are turned off.
    """
    found = _require_layers(model, "disabled")
    merged = [(n, m) for n, m in found if m.adapter_state.merged]
    _refuse_sharded(merged, "unmerge (for peftlite.disabled)", model)
    check_unmergeable(merged, "peftlite.disabled: unmerge")
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
