"""The block partition of a model: the units that layer-wise LR decay scales, from input to output.

A block is what timm's ``group_matcher`` calls one, when the model has one (and timm is installed).
Otherwise the blocks are found from the structure:

- a *stage* is the first ``nn.Sequential`` / ``nn.ModuleList`` met on each path down from the root
  (resnet ``layer1``, torchvision ViT ``encoder.layers``); each of its children is a block
  (``layer1.0``, ``encoder.layers.encoder_layer_3``). Blocks are not searched further, so a resnet
  block's ``downsample`` Sequential stays inside it.
- parameters outside every stage are grouped in runs of registration order: the run before the first
  block is ``stem``, the run after the last is ``head``, a run in between is named by its modules
  (``encoder.ln``).
- a model with no Sequential/ModuleList at all takes its top-level children as the blocks.

Every parameter of the model is in exactly one block, frozen or not, so the partition (and each
block's LR scale) does not change when parameters are frozen or unfrozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..selection import owners


@dataclass(frozen=True)
class Block:
    """One block: its readable name and its parameters' qualified names, in registration order."""

    name: str
    params: tuple[str, ...]


def blocks(model: nn.Module) -> list[Block]:
    """The model's blocks, from input (index 0) to output (last), covering every parameter once.

    Args:
        model: any nn.Module; wrapped or not (adapters belong to the block of the layer they adapt).
    Returns:
        the blocks, in order; empty for a model without parameters.
    """
    if callable(getattr(model, "group_matcher", None)):
        found = _timm_blocks(model)
        if found is not None:
            return found
    return _structural_blocks(model)


def _timm_blocks(model: nn.Module) -> list[Block] | None:
    try:
        from timm.models import group_parameters
    except ImportError:
        return None
    grouping = group_parameters(model, model.group_matcher(coarse=False))  # {block id: [names]}
    groups = [list(grouping[k]) for k in sorted(grouping)]
    return [Block(name, tuple(g)) for name, g in zip(_names(model, groups), groups, strict=True)]


def _stage_children(model: nn.Module) -> list[str]:
    found: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > 0:
            found.extend(f"{prefix}{name}" for name, _ in module.named_children())
            return
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return found or [name for name, _ in model.named_children()]


def _structural_blocks(model: nn.Module) -> list[Block]:
    children = set(_stage_children(model))
    runs: list[tuple[str | None, list[str]]] = []  # (stage child or None for a loose run, params)
    for name, _ in model.named_parameters():
        owner = next((m for m in owners(name)[1:] if m in children), None)
        if runs and runs[-1][0] == owner:
            runs[-1][1].append(name)
        else:
            runs.append((owner, [name]))
    staged = [i for i, (owner, _) in enumerate(runs) if owner is not None]
    loose = [g for owner, g in runs if owner is None]
    loose_names = iter(_names(model, loose))
    out = []
    for i, (owner, group) in enumerate(runs):
        if owner is not None:
            out.append(Block(owner, tuple(group)))
            continue
        name = next(loose_names)
        if staged and i < staged[0]:
            name = "stem"
        elif staged and i > staged[-1]:
            name = "head"
        out.append(Block(name, tuple(group)))
    return out


def _names(model: nn.Module, groups: list[list[str]]) -> list[str]:
    """A readable name per group: for each parameter, the shortest module (or parameter) name that holds
    only parameters of its group; the distinct ones joined by ``+`` (``blocks.11+norm``)."""
    gid = {name: i for i, g in enumerate(groups) for name in g}
    where: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        for prefix in [*owners(name)[1:], name]:
            where.setdefault(prefix, set()).add(gid.get(name, -1))
    out = []
    for group in groups:
        parts: list[str] = []
        for name in group:
            label = next(p for p in [*owners(name)[1:], name] if len(where[p]) == 1)
            if label not in parts:
                parts.append(label)
        out.append("+".join(parts))
    return out


def block_index(model: nn.Module) -> tuple[list[Block], dict[str, int]]:
    """The blocks and a map from parameter name to its block's index."""
    found = blocks(model)
    return found, {name: i for i, b in enumerate(found) for name in b.params}
