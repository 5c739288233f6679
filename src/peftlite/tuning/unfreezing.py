"""Unfreezer: progressive unfreezing that keeps LR schedulers and resuming working.

    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-3))
    unfreezer = peftlite.Unfreezer(model, opt, {0: ["fc"], 2: ["layer3"], 4: ["layer2"]}, lr=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, ...)   # after the Unfreezer
    for epoch in range(epochs):
        unfreezer.step(epoch)
        ...train one epoch...

Adding param groups in the middle of a run breaks ``LambdaLR`` (it zips its lambdas with the groups),
``OneCycleLR`` (no ``initial_lr`` for the new group) and resuming (the optimizer's state_dict changes
shape). So the Unfreezer adds every scheduled parameter that the optimizer lacks to the optimizer when
it is built, in groups of their own with their LR, and freezes every scheduled parameter
(``requires_grad=False``: no gradient, so torch optimizers skip it, weight decay and momentum included).
``step(epoch)`` sets ``requires_grad`` from the schedule: a stage trains from its epoch on. From then on
the optimizer and schedulers see a fixed set of groups, and the scheduler drives the new groups' LRs
like the others.

Order: build the optimizer, then the Unfreezer, then any LR scheduler. To resume, build all three the
same way again, then load their states in any order: the Unfreezer's state is its schedule and last
epoch, and the optimizer's groups are the same as when it was saved.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import selection
from . import freezing
from . import groups as groups_


class Unfreezer:
    """Unfreeze stages of a model at given epochs, with every stage registered in the optimizer up front.

    Args:
        model: the model being trained.
        optimizer: a ``torch.optim`` optimizer, created before this and before any LR scheduler.
        schedule: ``{epoch: patterns}``; at ``step(e)`` every stage with ``epoch <= e`` trains. The
            patterns select parameters, as in ``freeze``. Parameters named in no stage are left alone
            (adapters and heads from ``wrap`` keep training).
        lr: LR of the groups added for scheduled parameters the optimizer lacks (default: the
            optimizer's default LR). Scheduled parameters already in the optimizer keep their group.
        lrs, layer_decay, no_decay: as in ``param_groups``, for the added groups.
        weight_decay: for the added groups' decaying parameters (default: the optimizer's default).
        loraplus_ratio: LoRA+ for the added groups, as in ``param_groups``: each added adapter B gets the
            ratio times the LR its A gets from these options (schedule a pair's A and B together, as
            a layer or module pattern does). Groups already in the optimizer are left as they are.
    Raises:
        ValueError: a bad schedule (an epoch that is not an int >= 0, a stage that selects nothing or
            names a missing module, a parameter in two stages), bad options, or an optimizer that already
            has an LR scheduler when groups must be added; with ``loraplus_ratio``, no adapter B among
            the added parameters, or an added B whose A is already in the optimizer (its LR is set
            there). The model and optimizer are then unchanged.
        TypeError: not an optimizer, or a schedule that is not a dict of patterns.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: Mapping[int, Sequence[str]], *, lr: float | None = None,
                 lrs: Mapping[str, float] | None = None,
                 layer_decay: float | None = None, weight_decay: float | None = None,
                 no_decay: Sequence[str] = ("bias", "norm"), loraplus_ratio: float | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Unfreezer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.stages = _check_schedule(model, schedule)
        lr = optimizer.defaults.get("lr") if lr is None else lr
        if weight_decay is None:
            weight_decay = optimizer.defaults.get("weight_decay", 0.0)
        options = groups_.check_options(lr, lrs, layer_decay, weight_decay, no_decay, loraplus_ratio, "Unfreezer")

        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = dict(model.named_parameters())
        new, added = [], []
        for epoch, names in self.stages.items():
            missing = [n for n in names if id(params[n]) not in held]
            if missing:
                new += groups_.build(model, missing, *options, prefix=f"unfreeze@{epoch}/", what="Unfreezer")
            added += missing
        if loraplus_ratio is not None:
            _check_loraplus(groups_.lora_pairs(model), added, {n for n, p in params.items() if id(p) in held},
                            loraplus_ratio)
        if new and any("initial_lr" in g for g in optimizer.param_groups):
            raise ValueError("Unfreezer: the optimizer already has an LR scheduler (its groups have "
                             "initial_lr), and the Unfreezer must add groups; create the Unfreezer before "
                             "the scheduler")
        named = bool(optimizer.param_groups) and "param_names" in optimizer.param_groups[0]
        ids = {id(p): n for n, p in params.items()}

        # Validated: from here on, change the model and optimizer.
        for group in new:
            if named:  # torch requires all groups with or without names
                group["param_names"] = [ids[id(p)] for p in group["params"]]
            optimizer.add_param_group(group)
        self.added = [g["name"] for g in new]
        self.epoch: int | None = None
        freezing.set_requires_grad(model, self._scheduled(), False)
        freezing.warn_unsaved(model, self._scheduled(), "Unfreezer")

    def _scheduled(self) -> list[str]:
        return [n for names in self.stages.values() for n in names]

    def step(self, epoch: int) -> list[str]:
        """Set ``requires_grad`` for ``epoch``: the stages with epoch <= ``epoch`` train, the others not.

        Call it at the start of every epoch, 0 included. It depends only on ``epoch``, so calling it
        again, or jumping to a later epoch on resume, is safe.

        Returns:
            the names of the parameters this call unfroze (empty when nothing new).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"Unfreezer.step: epoch must be an int >= 0, got {epoch!r}")
        params = dict(self.model.named_parameters())
        unfrozen = []
        for start, names in self.stages.items():
            for name in names:
                flag = start <= epoch
                if flag and not params[name].requires_grad:
                    unfrozen.append(name)
                params[name].requires_grad_(flag)
        self.epoch = int(epoch)
        return unfrozen

    def state_dict(self) -> dict:
        """The schedule (parameter names per stage) and the last epoch stepped to; plain Python values."""
        return {"stages": {int(e): list(n) for e, n in self.stages.items()}, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the last epoch and apply it (``step``); the schedule must be the one this was built with.

        Raises:
            ValueError: a state from a different schedule (the model's requires_grad is then unchanged).
        """
        stages = {int(e): list(n) for e, n in dict(state.get("stages", {})).items()}
        if stages != {e: list(n) for e, n in self.stages.items()}:
            raise ValueError("Unfreezer.load_state_dict: the saved schedule differs from this Unfreezer's; "
                             "build the Unfreezer with the same model and schedule as the saved run")
        epoch = state.get("epoch")
        if epoch is None:  # saved before the first step: everything scheduled is frozen
            freezing.set_requires_grad(self.model, self._scheduled(), False)
        else:
            self.step(epoch)
        self.epoch = epoch

    def __repr__(self) -> str:
        stages = ", ".join(f"{e}: {len(n)} params" for e, n in self.stages.items())
        return f"Unfreezer({{{stages}}}, epoch={self.epoch}, added_groups={len(self.added)})"


def _check_loraplus(a_of: Mapping[str, str], added: Sequence[str], held: set[str], ratio: float) -> None:
    """Raise when loraplus_ratio would do nothing, or would have to follow an A the optimizer already holds."""
    bs = [n for n in added if n in a_of]
    if not bs:
        raise ValueError(f"Unfreezer: loraplus_ratio={ratio!r} applies to the adapter B matrices the Unfreezer "
                         "adds to the optimizer, and it adds none (the optimizer has them already, or the "
                         "schedule selects none); leave loraplus_ratio out")
    split = [n for n in bs if a_of[n] in held]
    if split:
        raise ValueError(f"Unfreezer: the schedule adds {split[0]!r} but its A {a_of[split[0]]!r} is already in "
                         "the optimizer, so loraplus_ratio cannot set B's LR from A's; schedule both in one "
                         "stage (e.g. by their layer's name) or neither")


def _check_schedule(model: nn.Module, schedule) -> dict[int, list[str]]:
    """{epoch: parameter names}, sorted by epoch; raises on bad epochs, unmatched patterns or overlaps."""
    if not isinstance(schedule, Mapping) or not schedule:
        raise TypeError("Unfreezer: schedule must be a non-empty dict {epoch: [patterns]}, e.g. "
                        f"{{0: ['fc'], 2: ['layer4']}}; got {schedule!r}")
    for epoch in schedule:
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"Unfreezer: schedule epoch {epoch!r} is not an int >= 0; epochs count from 0")
    stages: dict[int, list[str]] = {}
    owner: dict[str, int] = {}
    for epoch in sorted(schedule):
        patterns = selection.as_list(schedule[epoch])
        if not patterns:
            raise ValueError(f"Unfreezer: schedule[{epoch}] is empty; give it patterns or leave the epoch out")
        names = selection.select_tensors(model, patterns, f"Unfreezer schedule[{epoch}]")
        for name in names:
            if name in owner:
                raise ValueError(f"Unfreezer: parameter {name!r} is in two stages (epochs {owner[name]} "
                                 f"and {epoch}); each parameter may be unfrozen by one stage only")
            owner[name] = int(epoch)
        stages[int(epoch)] = names
    return stages
