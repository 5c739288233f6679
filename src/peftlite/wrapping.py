"""wrap / unwrap, and the one definition of what trains and what an adapter file holds.

What trains after ``wrap`` (``trained_names``) and what ``save`` writes (``saved_tensors``) are both
derived from the model's adapted layers and its ``WrapState``: the active adapters (all of one named
adapter, for a file), plus every tensor under a *full unit* (a head, a ``trainable=`` module or tensor,
and with ``train_bn`` every BatchNorm). Full units are shared by all named adapters.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import merging, selection
from .layers import adapted_layers, batchnorm, principal, registry
from .layers.spec import AdapterSpec, is_principal
from .state import WrapState, adapter_tensors, add, apply_active, refuse_busy, wrap_state


def under(name: str, units: Sequence[str]) -> bool:
    """Is ``name`` one of ``units`` or inside one of them (``""`` is the whole model)?"""
    return any(u == "" or name == u or name.startswith(u + ".") for u in units)


# ---- what trains, what is saved ----------------------------------------------------------------

def full_units(model: nn.Module, state: WrapState) -> list[str]:
    """Names whose every tensor trains and is saved: heads, ``trainable=`` names, BatchNorms with train_bn."""
    units = state.heads + state.trainable
    if state.train_bn:
        units = units + [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    return units


def trained_names(model: nn.Module, state: WrapState) -> set[str]:
    """The parameter names that train: the active adapters' and the full units'."""
    units = full_units(model, state)
    return set(adapter_tensors(model, list(state.active))) | {n for n, _ in model.named_parameters() if under(n, units)}


def alias_names(model: nn.Module) -> list[str]:
    """The names under which a module registered earlier appears again (timm's CoaT shares its position
    encodings between blocks). ``named_modules()`` lists such a module once, under its first name;
    ``state_dict()`` lists its tensors under every name."""
    seen, out = {id(model)}, []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if id(child) in seen:
                out.append(full)
            else:
                seen.add(id(child))
                visit(full, child)

    visit("", model)
    return out


def saved_tensors(model: nn.Module, state: WrapState, adapters: Sequence[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """What files hold, by state_dict key: the adapters ``adapters`` (all when None; a file holds one) and
    every tensor of the full units.

    A module registered under several names is saved once, under its first name (as ``adapted_layers``
    and ``named_modules`` name it), even where a full unit holds one of its other names; a model that
    loads the file has the same module under the other names, so they see the values too.
    """
    units = full_units(model, state)
    adapters = adapter_tensors(model, adapters)
    aliases = alias_names(model)
    return {k: t for k, t in model.state_dict().items()
            if not k.endswith("_extra_state") and (k in adapters or under(k, units)) and not under(k, aliases)}


def apply_freezing(model: nn.Module, state: WrapState) -> None:
    """requires_grad = active adapter, head, trainable module or tensor, or (with train_bn) BatchNorm affine."""
    keep = trained_names(model, state)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


# ---- resolving the arguments ---------------------------------------------------------------------

def resolve_heads(model: nn.Module, heads: Mapping | None, index: selection.Index) -> dict[str, nn.Module]:
    """``{module name: new module}``: each key is a pattern that must select exactly one module."""
    if heads is None:
        return {}
    if not isinstance(heads, Mapping):
        raise TypeError(f"heads must be a dict of module name (or pattern) -> nn.Module, got {type(heads).__name__}")
    out = {}
    for key, head in heads.items():
        if not isinstance(head, nn.Module):
            raise TypeError(f"heads[{key!r}] must be an nn.Module, got {type(head).__name__}")
        found = [n for n in selection.select_modules(model, key, f"heads[{key!r}]", index) if n]
        if len(found) != 1:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise ValueError(f"heads[{key!r}] selects {len(found)} modules ({shown}); a head key must select "
                             "exactly one module to replace: give its full name")
        out[found[0]] = head
    return out


def trainable_units(model: nn.Module, patterns, index: selection.Index) -> list[str]:
    """The names ``trainable=`` selects, as few as cover it: whole modules where every parameter of the
    module is selected (so its buffers are saved too), single parameters elsewhere."""
    chosen = set(selection.select_tensors(model, patterns, "trainable", index=index))
    held: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        for owner in selection.owners(name)[1:]:
            held.setdefault(owner, []).append(name)
    units: list[str] = []
    for name in index.modules:
        if name and not under(name, units) and held.get(name) and all(p in chosen for p in held[name]):
            units.append(name)
    return units + [n for n, _ in model.named_parameters() if n in chosen and not under(n, units)]


def resolve_targets(model: nn.Module, targets, skip: Sequence[str] = (),
                    index: selection.Index | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``targets`` selects for adapting, in registration order.

    A selected adaptable module is adapted; a selected container adapts the adaptable modules beneath
    it; an exact name of an unadaptable leaf (``"bn1"``) is an error. ``nn.MultiheadAttention`` brings
    its ``out_proj``. Modules under ``skip`` (the heads) are never adapted.

    Raises:
        ValueError: the list selects no adaptable module, or an exact name names nothing (a typo).
        TypeError: an exact name of an unsupported module, or a module whose semantics can't be kept.
    """
    index = index or selection.Index.of(model)
    patterns = selection.as_list(targets)
    adaptable = {n: m for n, m in index.modules.items() if registry.kind_of(m) is not None and not under(n, skip)}
    chosen: set[str] = set()
    named, picked = [], []
    for pattern in patterns:
        test = selection.predicate(pattern, index, "targets")
        hits = [(n, m) for n, m in index.modules.items() if test(n, m)]
        named.append([n for n, _ in hits])
        found = set()
        for name, module in hits:
            if name in adaptable:
                found.add(name)
            elif selection.is_exact(pattern) and not any(True for _ in module.children()) and not under(name, skip):
                raise TypeError(f"target {pattern!r} is a {type(module).__name__}, which peftlite cannot adapt; "
                                f"supported types: {registry.SUPPORTED_NAMES}. Pass it in trainable=[...] to train "
                                "it in full")
            else:  # a container: everything adaptable beneath it
                found |= {n for n in adaptable if n.startswith(name + ".") or name == ""}
        picked.append(sorted(found))
        chosen |= found
    hint = lambda p: selection.hint(p, adaptable, "adaptable modules")
    selection.check_exact(named, patterns, "targets", "module", hint)
    noun = f"adaptable module ({registry.SUPPORTED_NAMES}){' outside the heads' if skip else ''}"
    selection.check_any(picked, patterns, "targets", noun, hint)
    for name in list(chosen):  # attention is adapted as one unit, out_proj included
        if isinstance(index.modules[name], nn.MultiheadAttention):
            chosen.add(f"{name}.out_proj" if name else "out_proj")
    return [(n, index.modules[n]) for n in index.modules if n in chosen]


# ---- wrap / unwrap ---------------------------------------------------------------------------------

def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    old = model.get_submodule(name)
    ref = next(old.parameters(), None)
    if ref is not None:  # a head goes where the module it replaces was
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    setattr(model.get_submodule(parent_name), leaf, new)


def check_name(name: object, what: str) -> str:
    """An adapter name: a non-empty string without dots (it becomes a state_dict key part)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{what}: adapter name {name!r} must be a non-empty string without dots, e.g. 'default'")
    return name


def wrap(model: nn.Module, targets=None, *, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
         heads: Mapping[str, nn.Module] | None = None, trainable=None, train_bn: bool = False,
         name: str = "default", variant: str = "lora", rank_scaling: str = "linear", kind: str = "lora",
         decompose_factor: int = -1, decompose_both: bool = False, init: str = "default",
         tucker: bool = False) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters to the ``targets``, new ``heads``, and ``trainable`` tensors.

    Works in place and returns the same object. Everything is validated before the model is touched.
    Every pattern argument follows the one pattern language (``peftlite.selection``, docs/guide.md).

    Wrapping again adds to the model: with a new ``name``, a new adapter, which becomes the only active
    one (what trains now; ``peftlite.use`` switches); with a name the model has, the same adapter on
    more layers (the active set is unchanged). Heads and trainable tensors are shared by all adapters.

    Args:
        model: any nn.Module.
        targets: pattern(s) selecting modules: globs, exact or bare names (``"query"``), a compiled
            ``re.Pattern``, an ``nn.Module`` subclass or tuple of them, a callable ``(name, module) ->
            bool``, or a list (the union). Containers select the adaptable layers beneath them.
        rank: r of every adapter. alpha: scale = alpha / rank (default alpha = rank).
        dropout: dropout on the adapter input, in training only.
        heads: ``{name or pattern: new module}``; each key selects exactly one module, which the new
            module replaces; heads train in full.
        trainable: pattern(s) selecting tensors trained in full (``"layer4"`` trains all of layer4,
            ``"fc.weight"`` one parameter).
        train_bn: False: BatchNorms use and keep their running statistics, even in train().
            True: BatchNorm affine params train, their statistics adapt, and all of it is saved.
        name: the adapter's name (``"default"``).
        variant: ``"lora"``, or ``"dora"`` (weight-decomposed: a learned per-output-row magnitude times the
            direction of ``W + scale·ΔW``; docs/guide.md, "DoRA").
        rank_scaling: ``"linear"`` (scale = alpha / rank) or ``"sqrt"`` (rsLoRA: alpha / sqrt(rank)).
        kind: ``"lora"`` (ΔW = B @ A), ``"loha"`` (ΔW = (B1 @ A1) ⊙ (B2 @ A2), ``rank`` per factor pair;
            docs/guide.md, "LoHa") or ``"lokr"`` (ΔW = W1 ⊗ W2; docs/guide.md, "LoKr").
        decompose_factor, decompose_both: LoKr only, as PEFT's ``LoKrConfig``: the split of each dimension
            (-1: near its square root; f: f and dim / f when f divides it), and whether W1 is low-rank too.
        tucker: LoHa and LoKr only, PEFT's ``use_effective_conv2d`` (LyCORIS's ``use_tucker``): on kh×kw convs,
            each low-rank input factor is a core (r, r, kh·kw) contracted with an (r, in/groups) factor.
        init: ``"default"`` (B = 0: the layer starts as the base), or a principal-component init of plain LoRA
            (PEFT's ``init_lora_weights`` names): ``"pissa"`` (the adapter starts at the weight's top-r singular
            part, ``"pissa_niter_N"`` by a randomized SVD) or ``"olora"`` (the first r columns of its QR). The
            base weight then holds the rest, written in place through the exact merge kernels; the model
            computes what it did, to rounding. ``peftlite.restore_base``, ``delete`` and ``unwrap(merge=False)``
            give the original weights back bit for bit; files hold a plain LoRA on the original weights
            (docs/guide.md, "PiSSA and OLoRA").
    Returns:
        ``model``, wrapped.
    Raises:
        ValueError: bad rank/alpha/dropout/name, a pattern list that selects nothing, a typo in an exact
            name, nothing to train, a layer that already has an adapter of this name, a merged model; with a
            principal init: a rank above a layer's min(out, fan_in), weights on the meta device or not finite,
            a tied weight, a layer that already holds a principal init's residual (the model is unchanged).
        TypeError: a target that cannot be adapted (names the module, its type and the supported types).
    """
    spec = AdapterSpec(rank=rank, alpha=alpha, dropout=dropout, variant=variant, rank_scaling=rank_scaling, kind=kind,
                       decompose_factor=decompose_factor, decompose_both=decompose_both, init=init, tucker=tucker)
    return wrap_spec(model, targets, spec, heads=heads, trainable=trainable, train_bn=train_bn, name=name)


def wrap_spec(model: nn.Module, targets, spec: AdapterSpec, *, heads: Mapping[str, nn.Module] | None = None,
              trainable=None, train_bn: bool = False, name: str = "default",
              layer_specs: Mapping[str, AdapterSpec] | None = None) -> nn.Module:
    """``wrap`` with the adapter's hyper-parameters as an ``AdapterSpec``: ``spec``, or per layer name
    ``layer_specs`` (a file's layer entries, with fields ``wrap`` has no argument for: a LoKr layer's split)."""
    layer_specs = layer_specs or {}
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap takes an nn.Module, got {type(model).__name__}")
    name = check_name(name, "wrap")
    index = selection.Index.of(model)
    heads = resolve_heads(model, heads, index)
    units = trainable_units(model, trainable, index) if trainable is not None else []
    if targets is None and not heads and not units:
        raise ValueError("wrap: nothing to train; give targets= (layers to adapt), heads= or trainable=")
    state = wrap_state(model)
    if state is not None and state.train_bn != bool(train_bn):
        raise ValueError(f"model is already wrapped with train_bn={state.train_bn}; wrap again with the same value")
    refuse_busy(model, "wrap", routed=False)
    if state is not None and state.hotswap is not None and targets is not None:
        raise ValueError("wrap: the model is prepared for hot-swapping; add adapters before prepare_hotswap, or "
                         "hotswap a file into an existing name")
    plan = resolve_targets(model, targets, skip=list(heads), index=index) if targets is not None else []
    kinds = [registry.check_adaptable(n, module, name) for n, module in plan]
    principal.refuse_dora(plan, spec, name)
    starts = principal.plan(model, plan, kinds, spec, name) if is_principal(spec.init) else []

    # Validated: from here on, change the model.
    records = principal.write(starts)  # all or nothing: every residual written, or none
    if state is None:
        state = WrapState(train_bn=bool(train_bn),
                          requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model._peftlite = state
    for head_name, head in heads.items():
        _replace(model, head_name, head)
        state.heads.append(head_name)
    for (layer, module), kind in zip(plan, kinds, strict=True):
        registry.attach(module, kind, layer_specs.get(layer, spec), adapter=name)
    principal.install(starts, records, name, spec.init)
    on_meta = [n for n, module in plan if any(p.is_meta for p in module.lora[name].parameters())]
    if plan:
        add(state, name, make_active=True)
    apply_active(model, state)
    state.trainable += [n for n in units if n not in state.trainable]
    apply_freezing(model, state)
    if not state.train_bn:
        for bn_name, m in model.named_modules():
            if batchnorm.freezable(m) and not under(bn_name, state.heads + state.trainable):
                batchnorm.freeze_stats(m)
    for lean_name, m in model.named_modules():
        if not under(lean_name, state.heads + state.trainable):
            registry.make_lean(m)
    if on_meta:
        warnings.warn(
            f"wrap: {len(on_meta)} adapted layer(s) are on the meta device ({on_meta[0]}, ...), so their new "
            f"adapters {name!r} hold no values, and model.to_empty(...) leaves them uninitialised (B is not zero). "
            "Materialise, then load them: model.to_empty(device=...), the base weights, then peftlite.load(model, "
            "adapter_file). To train fresh adapters, wrap after the model holds its weights", UserWarning, stacklevel=2)
    return model


def unwrap(model: nn.Module, merge: bool = True, untie: bool = False) -> nn.Module:
    """Give back plain torch modules: adapters merged into the weights (``merge=True``) or dropped.

    Frozen BatchNorms get their class back, base parameters their requires_grad from before wrap; new
    heads stay. The state_dict keys are the original model's again (plus any new head's). The merge is
    all or nothing: if any layer fails, the model is left wrapped and unmerged.

    A tied weight (GPT-2's, T5's, BERT-MLM's output Linear shares the embedding's tensor) is refused as
    ``peftlite.merge`` refuses it; with ``untie=True`` the layer keeps a merged copy of its own, so the
    model comes back untied (the embedding keeps W). A transformers config that says
    ``tie_word_embeddings=True`` would tie them again on reload: set it to False before ``save_pretrained``.
    With ``merge=False`` every weight is the base one again, ties included, and a principal init's (PiSSA,
    OLoRA) residual base gives back the original weights bit for bit. With ``merge=True`` the weights hold
    what the model computes: the residual plus the merged adapters.
    """
    state = wrap_state(model)
    if state is None:
        raise ValueError("unwrap: the model is not wrapped by peftlite (no peftlite.wrap call on it)")
    found = adapted_layers(model)
    todo = [(n, m) for n, m in found if not m.adapter_state.merged]
    if merge and todo:
        if any(not m.adapter_state.enabled for _, m in found):
            raise RuntimeError("unwrap(merge=True) inside peftlite.disabled(model); unwrap after the block")
        untied = merging.untie_shared(model, todo, untie, "peftlite.unwrap")
        try:
            merging.merge_all(todo)
        except BaseException:
            for layer in untied:
                registry.retie(layer)
            raise
    if not merge:
        merging.check_unmergeable([(n, m) for n, m in found if m.adapter_state.merged], "unwrap(merge=False)")
    if not merge:
        principal.check_restorable(found, "unwrap(merge=False)")
    for name, layer in found:
        if not merge and layer.adapter_state.merged:
            merging.unmerge_layer(layer, name)
            registry.retie(layer)
        if not merge:
            principal.restore(layer, name)  # a principal init's residual: the original weights, bit-exactly
        registry.detach(layer)
    for _, m in model.named_modules():
        if isinstance(m, batchnorm.FrozenStats):
            batchnorm.unfreeze_stats(m)
        registry.make_plain(m)
    for name, p in model.named_parameters():
        if name in state.requires_grad and not under(name, state.heads):
            p.requires_grad_(state.requires_grad[name])
    del model.__dict__["_peftlite"]
    return model


def restore_base(model: nn.Module) -> nn.Module:
    """Give every layer whose base holds a principal init's residual (``wrap(init="pissa" | "olora")``) its
    original weights back, bit for bit, keeping what the model computes: each such adapter becomes the plain
    LoRA of rank 2r on the original weights (``[A; A0]``, ``[B, -B0]``, alpha × 2: the scale kept), as files
    hold it. Its A and B are new parameters: rebuild the optimizer. A model without a residual: a no-op.

    Raises:
        AdapterStateError: the model is merged (unmerge first) or inside ``per_sample`` / ``disabled``.
        RuntimeError: a weight moved device or dtype since its residual was written (the model is unchanged).
    """
    state = wrap_state(model)
    if state is None:
        raise ValueError("restore_base: the model is not wrapped by peftlite (no peftlite.wrap call on it)")
    refuse_busy(model, "restore_base", disabled=True)
    held = [(n, m) for n, m in adapted_layers(model) if m.adapter_state.residual is not None]
    principal.check_restorable(held, "restore_base")
    for name, layer in held:
        principal.restore(layer, name, plain=True)
    return model
