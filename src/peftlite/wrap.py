"""wrap / unwrap: freeze a model, add adapters and heads, and take them out again."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import batchnorm, layers
from . import merge as merging
from . import targets as targets_


@dataclass
class WrapState:
    """What wrap did to the model as a whole, kept on the root module as ``model._peftlite``."""

    heads: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)  # module names, resolved from the globs
    train_bn: bool = False
    requires_grad: dict[str, bool] = field(default_factory=dict)  # each base param's flag before wrap


def wrap_state(model: nn.Module) -> WrapState | None:
    return model.__dict__.get("_peftlite")


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _check_hparams(rank, alpha, dropout) -> float:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}; typical values are 4 to 64")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number (scale = alpha / rank), got {alpha!r}; "
                         "leave it None for alpha = rank")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return float(alpha)


def _check_heads(model: nn.Module, heads: Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
    if heads is None:
        return {}
    if not isinstance(heads, Mapping):
        raise TypeError(f"heads must be a dict of qualified name -> nn.Module, got {type(heads).__name__}")
    names = [n for n, _ in model.named_modules()]
    for name, head in heads.items():
        if not isinstance(head, nn.Module):
            raise TypeError(f"heads[{name!r}] must be an nn.Module, got {type(head).__name__}")
        if not isinstance(name, str) or name == "" or name not in names:
            raise ValueError(f"heads: no module named {name!r} to replace; nearest: "
                             f"{', '.join(targets_.nearest(name, names)) or '(none)'}")
    return dict(heads)


def resolve_targets(model: nn.Module, targets, skip: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``targets`` selects for adapting, in registration order.

    Raises:
        ValueError: a pattern selects no supported module (names the nearest modules).
        TypeError: an exact name of an unsupported module, or a module whose semantics can't be kept.
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen: dict[str, nn.Module] = {}
    for matcher in targets_.as_list(targets):
        picked: dict[str, nn.Module] = {}
        for name, module in targets_.select(model, matcher):
            if _under(name, skip):
                continue
            if layers.kind_of(module) is not None:
                picked[name] = module
            elif targets_.is_exact_name(matcher) and not any(True for _ in module.children()):
                raise TypeError(
                    f"target {matcher!r} is a {type(module).__name__}, which peftlite cannot adapt; supported "
                    f"types: {layers.SUPPORTED_NAMES}. Pass it in trainable=[...] to train it in full"
                )
            else:  # a container: everything supported beneath it
                for sub, m in module.named_modules(prefix=name):
                    if layers.kind_of(m) is not None and not _under(sub, skip):
                        picked[sub] = m
        if not picked:
            raise ValueError(f"target {targets_.describe(matcher)} matched no Linear, Conv2d or MultiheadAttention "
                             f"module; nearest: {', '.join(targets_.nearest(matcher, order)) or '(none)'}")
        chosen.update(picked)
    for name, module in list(chosen.items()):  # attention is adapted as one unit, out_proj included
        if isinstance(module, nn.MultiheadAttention):
            chosen[f"{name}.out_proj" if name else "out_proj"] = module.out_proj
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    old = model.get_submodule(name)
    ref = next(old.parameters(), None)
    if ref is not None:  # a head goes where the module it replaces was
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    setattr(model.get_submodule(parent_name), leaf, new)


def apply_freezing(model: nn.Module, state: WrapState) -> None:
    """requires_grad = adapter, head, trainable module, or (with train_bn) BatchNorm affine; nothing else."""
    keep = state.heads + state.trainable
    bn = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)] if state.train_bn else []
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        p.requires_grad_(".lora." in f".{name}" or _under(owner, keep) or owner in bn)


def wrap(model: nn.Module, targets=None, *, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
         heads: Mapping[str, nn.Module] | None = None, trainable: str | Sequence[str] | None = None,
         train_bn: bool = False) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters to the ``targets``, new ``heads``, and ``trainable`` modules.

    Works in place and returns the same object. Everything is validated before the model is touched.

    Args:
        model: any nn.Module.
        targets: glob(s) on qualified module names (``"layer4.*"``), a compiled ``re.Pattern``
            (fullmatch), an ``nn.Module`` subclass or tuple of them, a callable ``(name, module) -> bool``,
            or a list mixing these. Containers select the supported layers beneath them.
        rank: r of every adapter. alpha: scale = alpha / rank (default alpha = rank).
        dropout: dropout on the adapter input, in training only.
        heads: ``{qualified name: new module}``; each replaces an existing module and trains in full.
        trainable: glob(s) of modules trained in full (all their parameters).
        train_bn: False: BatchNorms use and keep their running statistics, even in train().
            True: BatchNorm affine params train, their statistics adapt, and all of it is saved.
    Returns:
        ``model``, wrapped.
    Raises:
        ValueError: bad rank/alpha/dropout, a pattern that selects nothing, nothing to train.
        TypeError: a target that cannot be adapted (names the module, its type and the supported types).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap takes an nn.Module, got {type(model).__name__}")
    alpha = _check_hparams(rank, alpha, dropout)
    heads = _check_heads(model, heads)
    patterns = [trainable] if isinstance(trainable, str) else list(trainable or [])
    trainable_names = targets_.match_names(model, patterns, "trainable")
    if targets is None and not heads and not trainable_names:
        raise ValueError("wrap: nothing to train; give targets= (layers to adapt), heads= or trainable=")
    state = wrap_state(model)
    if state is not None and state.train_bn != bool(train_bn):
        raise ValueError(f"model is already wrapped with train_bn={state.train_bn}; wrap again with the same value")
    plan = resolve_targets(model, targets, skip=list(heads)) if targets is not None else []
    kinds = [layers.check_adaptable(name, module) for name, module in plan]

    # Validated: from here on, change the model.
    if state is None:
        state = WrapState(train_bn=bool(train_bn),
                          requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model._peftlite = state
    for name, head in heads.items():
        _replace(model, name, head)
        state.heads.append(name)
    for (_, module), kind in zip(plan, kinds):
        layers.attach(module, kind, rank=rank, alpha=alpha, dropout=dropout)
    state.trainable += [n for n in trainable_names if n not in state.trainable]
    apply_freezing(model, state)
    if not state.train_bn:
        for name, m in model.named_modules():
            if batchnorm.freezable(m) and not _under(name, state.heads + state.trainable):
                batchnorm.freeze_stats(m)
    return model


def unwrap(model: nn.Module, merge: bool = True) -> nn.Module:
    """Give back plain torch modules: adapters merged into the weights (``merge=True``) or dropped.

    Frozen BatchNorms get their class back, base parameters their requires_grad from before wrap; new
    heads stay. The state_dict keys are the original model's again (plus any new head's).
    """
    state = wrap_state(model)
    if state is None:
        raise ValueError("unwrap: the model is not wrapped by peftlite (no peftlite.wrap call on it)")
    found = merging.adapted_layers(model)
    if merge and any(not m._lora_state.merged for _, m in found):
        merging.merge(model)  # with its finite checks: a failure leaves the model as it was
    for name, layer in found:
        if not merge and layer._lora_state.merged:
            merging.unmerge_layer(layer, name)
        layers.detach(layer)
    for _, m in model.named_modules():
        if isinstance(m, batchnorm.FrozenStats):
            batchnorm.unfreeze_stats(m)
    for name, p in model.named_parameters():
        if name in state.requires_grad and not _under(name.rpartition(".")[0], state.heads):
            p.requires_grad_(state.requires_grad[name])
    del model.__dict__["_peftlite"]
    return model


