"""prepare_hotswap / hotswap: replace an adapter's weights in a compiled model without recompiling.

    peftlite.prepare_hotswap(model, max_rank=64, targets=["*.query", "*.value"])   # before torch.compile
    compiled = torch.compile(model, fullgraph=True)
    peftlite.hotswap(model, "customer_b.safetensors", name="default")            # no recompilation

``prepare_hotswap`` gives every adapter a pair on every layer of the declared union (the adapted layers
plus ``targets``), padded with zeros to ``max_rank``, and moves its scale into a 0-d tensor
(``LowRank.scale_buffer``). The forward then reads no per-adapter Python value: the rank lives in the
zero padding, the scale in the buffer, and "this layer is off" is a zero scale. ``hotswap`` writes a
file's adapter into those tensors in place (any rank up to ``max_rank``, any alpha, any target set
within the union), so the compiled graph stays valid and equals eager. Prepare before building the
optimizer: the padded pairs are new parameters.

A file's layers outside the union, a rank above ``max_rank`` or a geometry that does not fit are
refused before anything changes. A pair that is off has ``alpha = 0`` and is left out of saved files.
"""

from __future__ import annotations

import numbers
import os
import warnings

import torch
from torch import nn

from .formats import native, schema
from .layers import AdaptedLayer, adapted_layers, principal, registry
from .layers.base import LowRank
from .layers.spec import AdapterSpec
from .state import activate, refuse_busy, wrap_state
from .switching import is_dora, kind_of_adapter, known
from .wrapping import resolve_targets


@torch.no_grad()
def _pad(pair: LowRank, max_rank: int) -> None:
    """Pad ``pair`` to ``max_rank`` in place of its parameters, its scale moved into ``scale_buffer``."""
    scale = pair.scale if pair.alpha > 0 else 0.0
    A = torch.zeros(max_rank, pair.A.shape[1], device=pair.A.device, dtype=pair.A.dtype)
    B = torch.zeros(pair.B.shape[0], max_rank, device=pair.B.device, dtype=pair.B.dtype)
    A[:pair.A.shape[0]] = pair.A
    B[:, :pair.B.shape[1]] = pair.B
    pair.A, pair.B = nn.Parameter(A), nn.Parameter(B)
    pair.scale_buffer = torch.tensor(scale, device=A.device, dtype=torch.float32)
    pair.rank, pair.alpha = max_rank, scale * max_rank


def prepare_hotswap(model: nn.Module, max_rank: int = 64, targets=None) -> nn.Module:
    """Make every adapter hot-swappable on the adapted layers and on ``targets`` (call before compiling).

    Args:
        max_rank: the largest rank a swapped-in adapter may have; at least every current rank.
        targets: pattern(s) selecting further layers that swapped-in adapters may target (as ``wrap``'s).
    Raises:
        ValueError: no adapters, a bad ``max_rank`` or one below a current rank, targets that select
            nothing. AdapterStateError: merged, or inside ``per_sample``.
    """
    state = wrap_state(model)
    if state is None or not state.adapters:
        raise ValueError("prepare_hotswap: the model has no adapters; wrap (or load) one first")
    other = [n for n in state.adapters if kind_of_adapter(model, n) != "lora"]
    if other:
        raise ValueError(f"prepare_hotswap: {other[0]!r} is a {kind_of_adapter(model, other[0])} adapter; "
                         "hot-swapping takes LoRA adapters only")
    dora = [n for n in state.adapters if is_dora(model, n)]
    if dora:
        raise ValueError(f"prepare_hotswap: {dora[0]!r} is a DoRA adapter; hot-swapping takes LoRA adapters only")
    if isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < 1:
        raise ValueError(f"prepare_hotswap: max_rank must be a positive integer, got {max_rank!r}")
    refuse_busy(model, "prepare_hotswap")
    union = {n: m for n, m in adapted_layers(model)}
    if targets is not None:
        union.update(resolve_targets(model, targets, skip=state.heads))
    for lname, layer in adapted_layers(model):
        for adapter, pairs in layer.adapters().items():
            for slot, pair in pairs.items():
                if pair.rank > max_rank:
                    raise ValueError(f"prepare_hotswap: adapter {adapter!r} has rank {pair.rank} on {lname} "
                                     f"({slot}), above max_rank={max_rank}; raise max_rank")
    kinds = {n: registry.kind_of(m) if isinstance(m, AdaptedLayer) else registry.check_adaptable(n, m)
             for n, m in union.items()}

    # Validated: from here on, change the model.
    for lname, module in union.items():
        for adapter in state.adapters:
            if not isinstance(module, AdaptedLayer) or adapter not in module.lora:
                registry.attach(module, kinds[lname], AdapterSpec(rank=max_rank), adapter=adapter)
                with torch.no_grad():
                    for pair in module.pairs(adapter).values():
                        pair.A.zero_()
                        pair.alpha = 0.0  # a slot that holds no adapter of this name (``LowRank.off``)
            for pair in module.pairs(adapter).values():
                if pair.scale_buffer is None:
                    _pad(pair, max_rank)
    state.hotswap = {"max_rank": int(max_rank), "layers": [n for n, _ in adapted_layers(model)]}
    activate(model, state)
    return model


def hotswap(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Write the adapter of file ``path`` (a peftlite file or a PEFT directory) into adapter ``name`` in place.

    The model must have been prepared (``prepare_hotswap``); a compiled model does not recompile. The
    file's heads and trainable tensors, shared by all adapters, are copied in place too.

    Raises:
        RuntimeError: not prepared. AdapterStateError: merged, or inside ``per_sample``. KeyError: an unknown ``name``.
        ValueError: a layer outside the prepared union, a rank above ``max_rank``, a shape or geometry
            that does not fit (the model is unchanged).
    """
    state = wrap_state(model)
    if state is None or state.hotswap is None:
        raise RuntimeError("hotswap: call peftlite.prepare_hotswap(model, max_rank=..., targets=...) first "
                           "(before torch.compile)")
    known(state, name, "hotswap")
    refuse_busy(model, "hotswap")
    principal.refuse_owner(adapted_layers(model), [name], "hotswap",
                           "a file holds a LoRA on the original weights; hot-swap into another adapter")
    _, tensors, config = native.read_adapter(path, model)
    other = {e.get("adapter_kind", "lora") for e in config["layers"].values()} - {"lora"}
    if other:
        raise ValueError(f"hotswap: {path} holds a {other.pop()} adapter; hot-swapping takes LoRA adapters only")
    tensors, config = schema.renamed(tensors, config, name)
    for key, t in tensors.items():  # as load does: a diverged adapter is refused
        if schema.adapter_layer(key, config["layers"]) is not None and native.non_finite(t):
            raise ValueError(f"hotswap: {path} holds non-finite values (NaN or Inf) in {key}; the model is unchanged")
    max_rank, union = state.hotswap["max_rank"], state.hotswap["layers"]
    modules = dict(model.named_modules())
    for lname, entry in config["layers"].items():
        if lname not in union:
            raise ValueError(f"hotswap: {path} adapts {lname!r}, outside the layers prepared for hot-swapping; "
                             "list it in prepare_hotswap(targets=...)")
        if entry.get("variant", "lora") != "lora":
            raise ValueError(f"hotswap: {path} holds a DoRA layer ({lname}); hot-swapping takes LoRA adapters only")
        if entry["rank"] > max_rank:
            raise ValueError(f"hotswap: {path} has rank {entry['rank']} on {lname}, above max_rank={max_rank}")
        schema.check_layer(lname, modules[lname], entry)
    shared = {k: t for k, t in model.state_dict(keep_vars=True).items()
              if schema.adapter_layer(k, config["layers"]) is None and k in tensors}
    for key, t in tensors.items():
        layer = schema.adapter_layer(key, config["layers"])
        if layer is not None:
            _check_pair_shape(path, key, t, _padded_shape(modules[layer], layer, key, name))
        elif key not in shared:
            raise ValueError(f"hotswap: {path} holds {key!r}, which the model has no place for")
        elif tuple(t.shape) != tuple(shared[key].shape):
            raise ValueError(f"hotswap: {key} has shape {tuple(t.shape)} in {path}, the model expects "
                             f"{tuple(shared[key].shape)}")

    # Validated: from here on, change the model (in place: a compiled graph stays valid).
    with torch.no_grad():
        changed = [k for k, t in shared.items() if not torch.equal(t, tensors[k].to(t))]
        for key, t in shared.items():
            t.copy_(tensors[key])
        for lname in union:
            entry = config["layers"].get(lname)
            pairs = modules[lname].pairs(name)
            for slot, pair in pairs.items():
                prefix = f"{lname}.lora.{name}" + ("" if list(pairs) == ["weight"] else f".{slot}")
                pair.A.zero_()
                pair.B.zero_()
                if entry is None:
                    pair.scale_buffer.fill_(0.0)
                    pair.alpha = 0.0
                    continue
                a, b = tensors[f"{prefix}.A"], tensors[f"{prefix}.B"]
                r = a.shape[0]
                pair.A[:r] = a
                pair.B[:, :r] = b
                scale = AdapterSpec.from_entry(entry, f"{path}: layer {lname!r}").scale
                pair.scale_buffer.fill_(scale)
                pair.alpha = scale * max_rank
    if changed:
        warnings.warn(f"hotswap: heads and trainable tensors are shared by all adapters, and {path} changed "
                      f"{len(changed)} of them", UserWarning, stacklevel=2)
    return model


def _padded_shape(layer, lname: str, key: str, name: str) -> tuple[int, int]:
    """The padded shape of the pair tensor ``key`` (``.A`` or ``.B``) in the prepared layer."""
    slot = key[len(f"{lname}.lora.{name}."):].rpartition(".")[0] or "weight"
    pair = layer.pairs(name)[slot]
    return tuple(pair.A.shape) if key.endswith(".A") else tuple(pair.B.shape)


def _check_pair_shape(path, key: str, t: torch.Tensor, padded: tuple[int, int]) -> None:
    """A file's A (r, fan_in) or B (out, r) fits a pair padded to ``padded`` when all but its rank agree."""
    fits = t.dim() == 2 and (t.shape[1] == padded[1] if key.endswith(".A") else t.shape[0] == padded[0])
    if not fits:
        raise ValueError(f"hotswap: {key} has shape {tuple(t.shape)} in {path}, which does not fit the model's "
                         f"{tuple(padded)} (rank padded to max_rank)")
