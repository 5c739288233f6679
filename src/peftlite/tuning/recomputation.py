"""Activation checkpointing for any model: the blocks of ``blocks(model)``, or the modules patterns select.

A checkpointed block keeps only its inputs for backward and runs its forward again during backward
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, the RNG state replayed, so dropout draws
the same masks). Its class is swapped to ``Checkpointed<Class>`` (derived once per class by
``layers/registry.derived_class``), whose forward runs the class's own forward under checkpoint: no
wrapper module, so every state_dict key stays; giving the module its class back undoes it. Module hooks
run once (outside the checkpoint); hooks of the modules inside a block run again in the recomputation.

What is checkpointed by default: the blocks of the partition (``tuning/partition.py``) that are members
of a stage, a module whose parent is an nn.Sequential / nn.ModuleList and that holds other modules:
``layer1.0``, ``encoder.layers.encoder_layer_3``, timm's ``blocks.11`` (of the block timm names
``blocks.11+norm``: the final norm stays as it is). The runs of parameters outside the stages (``stem``,
``head``, ``encoder.ln``) are not stage members and stay as they are. A layer whose class ``wrap`` owns (an
adapted layer, a type peftlite adapts, a norm) is never checkpointed on its own: a block that holds it is.

BatchNorm: a norm that updates running statistics (train mode, tracking them) would update them twice per
step, in the forward and in its recomputation. During the recomputation the block's norms update copies
of their statistics instead, so the model's are updated once, by the forward, bit for bit as without
checkpointing (the recomputed outputs use the batch's statistics, so they do not change). Frozen
statistics (``wrap``'s default) are never updated either way. Under torch.compile the recomputation is
part of the compiled graph, where the statistics are written once, after the forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from ..layers.base import AdaptedLayer
from ..layers.batchnorm import FrozenStats
from ..layers.registry import derived_class, kind_of
from ..selection import Pattern, as_list, owners, select_modules
from .partition import blocks as partition

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class Checkpointed:
    """Mixin placed before a block's class: its forward runs the class's own forward under checkpoint."""

    _checkpoint_base: type

    def forward(self, *args, **kwargs):
        forward = super().forward
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)  # nothing is saved for backward, so nothing to recompute
        if torch.compiler.is_compiling():  # the statistics are written once by the compiled graph (module docstring)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=partial(_contexts, self), **kwargs)


def _contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """checkpoint's ``context_fn``: nothing around the forward; copies of the statistics around the recomputation."""
    norms = [m for m in block.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats
             and not isinstance(m, FrozenStats)]  # frozen ones read the model's mode but never update
    return contextlib.nullcontext(), _statistics_copies(norms)


@contextlib.contextmanager
def _statistics_copies(norms: list[_NormBase]) -> Iterator[None]:
    """Inside, each norm's running statistics are copies (updated and dropped); the originals are not written."""
    kept = [(m, {k: m._buffers[k] for k in _STATISTICS if m._buffers.get(k) is not None}) for m in norms]
    for m, originals in kept:
        m._buffers.update({k: t.clone() for k, t in originals.items()})
    try:
        yield
    finally:
        for m, originals in kept:
            m._buffers.update(originals)


def checkpointing(model: nn.Module, blocks: Pattern | Sequence[Pattern] | bool | None = None) -> nn.Module:
    """Checkpoint blocks of ``model``: each keeps only its inputs for backward and runs again in backward.

    Call it before ``torch.compile`` and before wrapping the model in DDP (a compiled model recompiles
    after a class changes). Gradients equal those of the plain step bit for bit, dropout included (the
    RNG state is replayed), and BatchNorm statistics are updated once per step (module docstring).

    Args:
        model: any nn.Module, wrapped by ``peftlite.wrap`` or not.
        blocks: None (or True): the blocks of ``peftlite.blocks(model)`` that are members of a stage (module
            docstring: ``layer1.0``, ``encoder.layers.encoder_layer_3``); ``stem``/``head`` runs stay as they are.
            Pattern(s) in the one pattern language (docs/guide.md, "Patterns"): the modules they select;
            where selected modules nest, the outermost. False: undo, every checkpointed module of
            ``model`` gets its own class back (a no-op when there is none).
    Returns:
        ``model``, in place. Calling it again checkpoints what is newly selected; blocks already
        checkpointed stay as they are (and modules inside them are not checkpointed again).
    Raises:
        ValueError: no block of ``model`` can be checkpointed (pass ``blocks=``); patterns that select
            nothing (the pattern language's error, with patterns that would match).
        TypeError: ``blocks`` is not a pattern (a module object: pass its name); a selected module is one
            whose class ``wrap`` owns (an adapted layer, a Linear/Conv2d/MultiheadAttention, a norm).
            Nothing is changed when it raises.
    """
    if blocks is False:
        for module in model.modules():
            base = type(module).__dict__.get("_checkpoint_base")
            if base is not None:
                module.__class__ = base
        return model
    chosen = _partition_modules(model) if blocks is None or blocks is True else _selected_modules(model, blocks)
    for module in chosen:
        if not isinstance(module, Checkpointed):
            cls = type(module)
            module.__class__ = derived_class(Checkpointed, cls, "Checkpointed", _checkpoint_base=cls)
    return model


def _owned_by_wrap(module: nn.Module) -> str | None:
    """Why ``wrap`` owns the module's class (so it must not be swapped here), or None."""
    if isinstance(module, AdaptedLayer):
        return f"an adapted layer ({type(module).__name__})"
    kind = kind_of(module)
    if kind is not None:
        return f"a layer peftlite adapts ({type(module).__name__}, an nn.{kind.base.__name__})"
    if isinstance(module, _NormBase):
        return f"a norm ({type(module).__name__})"
    return None


def _partition_modules(model: nn.Module) -> list[nn.Module]:
    """The members of stages among the blocks of the partition: modules named by a block (or by a part of
    its name, ``blocks.11`` of timm's ``blocks.11+norm``) whose parent is an nn.Sequential / nn.ModuleList,
    that hold other modules and are not owned by wrap."""
    modules = dict(model.named_modules())
    found, names = [], []
    for block in partition(model):
        names.append(block.name)
        for part in block.name.split("+"):
            module = modules.get(part)
            if (module is not None and part and isinstance(modules[owners(part)[-1]], (nn.Sequential, nn.ModuleList))
                    and any(True for _ in module.children()) and not _owned_by_wrap(module)):
                found.append(module)
    if not found:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") or "none"
        raise ValueError(
            f"checkpointing: {type(model).__name__} has no block that can be checkpointed (its blocks: {shown}; "
            "only members of an nn.Sequential / nn.ModuleList that hold other modules are); pass blocks= patterns "
            "selecting the modules to checkpoint, e.g. checkpointing(model, blocks='layers.*')"
        )
    return found


def _selected_modules(model: nn.Module, blocks: Pattern | Sequence[Pattern]) -> list[nn.Module]:
    """The outermost modules the patterns select, skipping those inside an already checkpointed module."""
    what = "checkpointing(blocks=)"
    for pattern in as_list(blocks):
        if isinstance(pattern, nn.Module):  # callable, so the pattern language would call it
            name = next((n for n, m in model.named_modules() if m is pattern), None)
            fix = f"pass its name, {name!r}" if name is not None else "it is not a module of this model"
            raise TypeError(f"{what}: got a module object ({type(pattern).__name__}), not a pattern; {fix}")
    modules = dict(model.named_modules())
    taken = {n for n, m in modules.items() if isinstance(m, Checkpointed)}
    found = []
    for name in select_modules(model, blocks, what):
        if name in taken or any(o in taken for o in (owners(name) if name else [])):
            continue
        reason = _owned_by_wrap(modules[name])
        if reason:
            holder = owners(name)[-1] if name else ""
            raise TypeError(f"{what}: module {name!r} is {reason}, a single layer whose class wrap owns; "
                            "checkpoint a block that holds it instead" + (f" ({holder!r})" if holder else ""))
        taken.add(name)
        found.append(modules[name])
    return found
