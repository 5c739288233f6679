"""combine: a new named adapter made from weighted existing ones, layer by layer.

    peftlite.combine(model, {"a": 0.7, "b": 0.3}, name="ab", how="linear" | "cat" | "svd", rank=None)

On every layer that has at least one of the inputs (a layer lacking one takes it as zero), with
``f_k = weight_k · scale_k`` and the new adapter applied with scale 1 (alpha = rank):

- ``"cat"``: ``A = cat(f_k A_k)``, ``B = cat(B_k)``: exactly the weighted sum ``Σ f_k ΔW_k``, at rank
  ``Σ r_k``;
- ``"linear"``: PEFT's ``add_weighted_adapter`` linear combination (equal ranks; A and B each summed with
  ``sqrt(|f_k|)`` factors): rank r, but ``B @ A`` holds cross terms, so it is not the weighted sum;
- ``"svd"``: the best rank-``rank`` approximation of the weighted sum (default: the largest input
  rank), from one layer's ΔW at a time.

The math is in ``functional`` (``combine_cat``, ``combine_linear``, ``combine_svd``). The new adapter is
added inactive (``peftlite.use(model, name)`` switches to it).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from torch import nn

from . import functional
from .layers import adapted_layers, principal, registry
from .layers.spec import AdapterSpec
from .state import activate, add, refuse_busy, wrap_state
from .switching import is_dora, kind_of_adapter, known
from .wrapping import check_name

HOWS = ("linear", "cat", "svd")


def _weights(model: nn.Module, weights) -> dict[str, float]:
    state = wrap_state(model)
    if state is None or not state.adapters:
        raise ValueError("combine: the model has no adapters; wrap or load some first")
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"combine: give a dict adapter name -> weight, e.g. {{'a': 0.7, 'b': 0.3}}; got {weights!r}")
    out = {}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or w != w or abs(w) == float("inf"):
            raise ValueError(f"combine: weight {w!r} for {name!r} is not a finite number")
        out[known(state, name, "combine")] = float(w)
    return out


def combine(model: nn.Module, weights: Mapping[str, float], name: str, how: str = "linear",
            rank: int | None = None) -> dict[str, float]:
    """Add adapter ``name``, the weighted combination of existing ones (see the module docstring).

    Returns:
        per layer, the relative Frobenius error ``‖B A - Σ f_k ΔW_k‖ / ‖Σ f_k ΔW_k‖`` of the new
        adapter against the weighted sum (0 up to rounding for ``"cat"``; the truncation error for
        ``"svd"``; the cross terms for ``"linear"``).
    Raises:
        KeyError: an unknown input. ValueError: a bad weight, ``how`` or ``rank``, unequal ranks for
        ``"linear"``, an existing ``name``, a merged model.
    """
    weights = _weights(model, weights)
    state = wrap_state(model)
    other = [n for n in weights if kind_of_adapter(model, n) != "lora"]
    if other:
        raise ValueError(f"combine: {other[0]!r} is a {kind_of_adapter(model, other[0])} adapter; combine makes a LoRA "
                         "adapter from LoRA ones (a weighted sum of LoHa or LoKr products is not such a product); "
                         "use several adapters at once with peftlite.use instead")
    dora = [n for n in weights if is_dora(model, n)]
    if dora:
        raise ValueError(f"combine: {dora[0]!r} is a DoRA adapter; magnitudes do not add, so a combination of "
                         "DoRA adapters has no defined meaning: combine LoRA adapters only")
    principal.refuse_owner(adapted_layers(model), list(weights), "combine",
                           "call peftlite.restore_base(model) first (it becomes a plain LoRA on the original weights)")
    check_name(name, "combine")
    if name in state.adapters:
        raise ValueError(f"combine: the model already has an adapter named {name!r}; pick another name")
    if how not in HOWS:
        raise ValueError(f"combine: how must be one of {', '.join(map(repr, HOWS))}, got {how!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"combine: rank must be a positive integer (svd only), got {rank!r}")
    if rank is not None and how != "svd":
        raise ValueError(f"combine: rank= applies to how='svd' only (how={how!r} fixes the rank)")
    refuse_busy(model, "combine", routed=False)
    plans = {}
    for lname, layer in adapted_layers(model):
        inputs = [(n, w) for n, w in weights.items() if n in layer.lora]
        if not inputs:
            continue
        plans[lname] = (layer, {slot: _combined(layer, slot, inputs, how, rank) for slot in layer.pairs(inputs[0][0])})
    if how == "linear":
        ranks = {new[0].shape[0] for _, slots in plans.values() for new in slots.values()}
        if len(ranks) > 1:  # each layer already checked its inputs; the new adapter needs one rank too
            raise ValueError(f"combine how='linear': the inputs' ranks differ between layers ({sorted(ranks)}); "
                             "use how='cat' or 'svd'")

    # Validated and computed: from here on, change the model.
    errors = {}
    for lname, (layer, slots) in plans.items():
        first = next(iter(slots.values()))
        registry.attach(layer, registry.kind_of(layer), AdapterSpec(rank=first[0].shape[0]), adapter=name)
        with torch.no_grad():
            for slot, (A, B, error) in slots.items():
                pair = layer.pairs(name)[slot]
                pair.A.copy_(A)
                pair.B.copy_(B)
                errors[lname if len(slots) == 1 else f"{lname}.{slot}"] = error
    add(state, name)
    activate(model, state)
    return errors


def _combined(layer, slot: str, inputs: list[tuple[str, float]], how: str, rank: int | None):
    """``(A, B, relative error)`` of the new pair on one weight of one layer."""
    pairs = [layer.pairs(n)[slot] for n, _ in inputs]
    factors = [w * p.scale for (_, w), p in zip(inputs, pairs, strict=True)]
    As, Bs = [p.A.detach() for p in pairs], [p.B.detach() for p in pairs]
    target = sum(f * (b.double() @ a.double()) for f, a, b in zip(factors, As, Bs, strict=True))  # (out, fan_in)
    if how == "svd":
        A, B, error = functional.combine_svd(target, rank or max(a.shape[0] for a in As))
        return A, B, error
    A, B = (functional.combine_cat if how == "cat" else functional.combine_linear)(As, Bs, factors)
    norm = float(target.norm())
    error = float((B.double() @ A.double() - target).norm()) / norm if norm > 0 else 0.0
    return A, B, error
