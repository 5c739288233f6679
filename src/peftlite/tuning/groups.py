"""param_groups: optimizer groups with per-pattern LRs, layer-wise LR decay, no-decay parameters and LoRA+.

    groups = peftlite.param_groups(model, 1e-3, lrs={"layer4.*": 1e-4}, layer_decay=0.75, weight_decay=0.05)
    opt = torch.optim.AdamW(groups)

Each trainable parameter lands in exactly one group. A parameter's LR is ``lrs[first matching pattern]``
(or ``lr``), times ``layer_decay ** (number of blocks - 1 - its block's index)`` when ``layer_decay`` is
given (see ``peftlite.blocks``), so the output block keeps the full LR and each block below gets
``layer_decay`` times the one above it. With ``loraplus_ratio`` (LoRA+, Hayou et al. 2024), every
adapter B then gets ``loraplus_ratio`` times the LR of its own A, in groups of its own (``.../loraplus``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import selection
from ..layers import adapted_layers
from ..layers.spec import is_positive
from .partition import block_index

NORM_TYPES: tuple[type, ...] = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                                nn.RMSNorm)


def _positive(value, what: str, fix: str) -> float:
    if not is_positive(value):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}; {fix}")
    return float(value)


def check_options(lr, lrs, layer_decay, weight_decay, no_decay, loraplus_ratio, what: str):
    """Validate and normalise the options shared by param_groups and the Unfreezer (changes nothing)."""
    lr = _positive(lr, f"{what}: lr", "e.g. lr=1e-3")
    lrs = {} if lrs is None else lrs
    if not isinstance(lrs, Mapping):
        raise TypeError(f"{what}: lrs must be a dict of pattern -> LR, e.g. {{'fc': 1e-3}}; got {type(lrs).__name__}")
    lrs = {p: _positive(v, f"{what}: lrs[{p!r}]", "give each pattern a positive LR") for p, v in lrs.items()}
    if layer_decay is not None:
        layer_decay = _positive(layer_decay, f"{what}: layer_decay", "use a factor in (0, 1], e.g. 0.75")
        if layer_decay > 1:
            raise ValueError(f"{what}: layer_decay={layer_decay!r} would raise LRs towards the input; "
                             "use a factor in (0, 1], e.g. 0.75")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"{what}: weight_decay must be a number >= 0, got {weight_decay!r}")
    if loraplus_ratio is not None:
        loraplus_ratio = _positive(loraplus_ratio, f"{what}: loraplus_ratio",
                                   "B's LR is ratio x A's LR, e.g. loraplus_ratio=16; None turns LoRA+ off")
    return lr, lrs, layer_decay, float(weight_decay), selection.as_list(no_decay), loraplus_ratio


def lora_pairs(model: nn.Module) -> dict[str, str]:
    """``{B's qualified name: its A's}`` for every low-rank pair of the model (per layer, adapter and slot).

    Read through the adapter protocol (``adapted_layers``, ``layer.adapters()``), so a pair is one
    ``LowRank``: an ``nn.MultiheadAttention`` with separate q/k/v weights has three per adapter.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(pair.B)]: names[id(pair.A)]
            for _, layer in adapted_layers(model)
            for slots in layer.adapters().values() for pair in slots.values()}


def decays(model: nn.Module, no_decay: Sequence) -> Callable[[str], bool]:
    """A predicate ``name -> bool``: does weight decay apply to this parameter?

    No decay for: every parameter of a normalization layer (by module type, since torchvision names
    its norms ``bn1``, ``ln_1``, ``features.0.1``), every bias, every parameter with one dimension or
    fewer, the names of a timm-style ``model.no_weight_decay()``, and what the ``no_decay`` patterns
    select (the one pattern language: ``"bias"`` selects every ``*.bias``, ``"*norm*"`` every parameter
    whose name or module name contains ``norm``). A pattern that selects nothing is not an error here:
    the defaults are meant for many models.
    """
    modules = dict(model.named_modules())
    extra = list(no_decay)
    hook = getattr(model, "no_weight_decay", None)
    if callable(hook):
        extra += [str(n) for n in hook()]
    params = dict(model.named_parameters())
    excluded = set(selection.select_tensors(model, extra, "no_decay", raise_empty=False)) if extra else set()

    def applies(name: str) -> bool:
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, NORM_TYPES) or name.rpartition(".")[2] == "bias" or params[name].ndim <= 1:
            return False
        return name not in excluded

    return applies


def build(model: nn.Module, names: Sequence[str], lr: float, lrs: Mapping[str, float],
          layer_decay: float | None, weight_decay: float, no_decay: Sequence[str],
          loraplus_ratio: float | None, prefix: str = "", what: str = "param_groups") -> list[dict]:
    """The groups for parameters ``names`` (checked options; see ``param_groups``).

    Groups are keyed by (block when layer_decay is given, first matching lrs pattern, decay or not, an
    adapter B under LoRA+ or not) and ordered by their first parameter's registration order.

    Raises:
        ValueError: under LoRA+, ``lrs`` or the blocks give a B another LR than its A (before the ratio).
    """
    params = dict(model.named_parameters())
    found, index = block_index(model) if layer_decay is not None else ([], {})
    applies = decays(model, no_decay)
    names_index = selection.Index.of(model)
    tests = [(p, selection.tensor_predicate(p, names_index, "lrs")) for p in lrs]
    a_of = lora_pairs(model) if loraplus_ratio is not None else {}

    def place(name: str) -> tuple[int | None, str | None, float]:
        """(block, first matching pattern, LR) of a parameter, by ``lrs`` and ``layer_decay``."""
        pattern = next((p for p, test in tests if test(name)), None)
        block = index[name] if layer_decay is not None else None
        scale = layer_decay ** (len(found) - 1 - block) if block is not None else 1.0
        return block, pattern, (lrs[pattern] if pattern else lr) * scale

    groups: dict[tuple, dict] = {}
    for name in names:
        block, pattern, group_lr = place(name)
        decay = applies(name)
        plus = name in a_of
        if plus:
            _, a_pattern, a_lr = place(a_of[name])
            if a_lr != group_lr:
                raise ValueError(
                    f"{what}: with loraplus_ratio, a B's LR is the ratio times its A's, but {name!r} gets "
                    f"{group_lr:g} (pattern {pattern!r}) and its A {a_of[name]!r} gets {a_lr:g} (pattern "
                    f"{a_pattern!r}); give both the same lrs pattern, e.g. one that selects the layer")
            group_lr = a_lr * loraplus_ratio
        key = (block, pattern, decay, plus)
        if key not in groups:
            label = [found[block].name] if block is not None else []
            label += [f"lrs[{pattern}]"] if pattern else []
            label += ["decay" if decay else "no_decay"] + (["loraplus"] if plus else [])
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": weight_decay if decay else 0.0,
                           "name": prefix + "/".join(label)}
        groups[key]["params"].append(params[name])
    return list(groups.values())


def param_groups(model: nn.Module, lr: float, *, lrs: Mapping[str, float] | None = None,
                 layer_decay: float | None = None, weight_decay: float = 0.0,
                 no_decay: Sequence[str] = ("bias", "norm"), loraplus_ratio: float | None = None) -> list[dict]:
    """Optimizer param groups for the model's trainable parameters, each exactly once.

    LoRA+ (``loraplus_ratio``, Hayou et al. 2024): B starts at zero and A does not, and giving B the
    larger LR makes feature learning efficient. So every adapter B gets ``loraplus_ratio`` times the
    final LR of its own A (the pair of the same layer, adapter name and adapted weight), after ``lrs``
    and ``layer_decay``, in a group of its own (``".../decay/loraplus"``) with the weight decay it would
    have had anyway. The ratio touches nothing else:

    - a DoRA ``magnitude`` (``(out,)``) is treated like A, not like B: it starts non-zero (at ``‖W‖``),
      as A does, so the reason for B's larger LR does not apply to it. It gets the LR ``lr``/``lrs``/
      ``layer_decay`` give it, which is its A's unless an ``lrs`` pattern picks it out, and no weight
      decay (it is 1-D). PEFT's ``create_loraplus_optimizer`` differs here: it gives every 1-D
      parameter B's LR.
    - heads, biases and other parameters trained in full are not adapter parameters and keep their LR
      (PEFT gives their 1-D parameters B's LR too).

    Args:
        model: any nn.Module; only parameters with ``requires_grad`` are included.
        lr: the LR of parameters no ``lrs`` pattern matches.
        lrs: ``{pattern: LR}`` selecting parameters as in ``freeze`` (``{"fc": 1e-3, "layer4.*": 1e-4}``);
            the first matching pattern wins. Raises when no pattern selects anything, or an exact name
            names nothing.
        layer_decay: scale LRs by ``layer_decay ** (blocks above)`` per block (``peftlite.blocks``;
            ``peftlite.summary(model, blocks=True)`` lists them). Multiplies the ``lrs`` LRs too.
        weight_decay: for parameters that decay; the others get 0 (see ``decays``).
        no_decay: extra patterns selecting parameters that get no weight decay (never raises).
        loraplus_ratio: turns LoRA+ on with this ratio of B's LR to A's (a positive number, e.g. 16);
            None (the default) is off.
    Returns:
        a list of dicts with ``params``, ``lr``, ``weight_decay`` and a readable ``name``
        (``"layer4.1/lrs[layer4.*]/no_decay"``), ready for any ``torch.optim`` optimizer.
    Raises:
        ValueError: a bad lr, layer_decay, weight_decay or loraplus_ratio; ``lrs`` patterns that select
            nothing (lists patterns that would match); no trainable parameter; ``loraplus_ratio`` with no
            adapter B that trains (an error, not a warning: the option would do nothing, which is most
            likely a model not wrapped yet or adapters frozen by mistake); a B whose ``lrs`` pattern gives
            it another LR than its A.
        TypeError: lrs not a dict, or a pattern that is not a string.
    """
    options = check_options(lr, lrs, layer_decay, weight_decay, no_decay, loraplus_ratio, "param_groups")
    if options[1]:
        selection.select_tensors(model, list(options[1]), "param_groups lrs")  # the typo rule
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("param_groups: the model has no trainable parameter; unfreeze some "
                         "(peftlite.unfreeze(model, 'fc')) or wrap it (peftlite.wrap) first")
    if loraplus_ratio is not None and not set(names) & set(lora_pairs(model)):
        raise ValueError(f"param_groups: loraplus_ratio={loraplus_ratio!r} multiplies the LR of adapter B "
                         "matrices, and no adapter B trains in this model; wrap it first (peftlite.wrap), "
                         "unfreeze its adapters, or leave loraplus_ratio out")
    return build(model, names, *options)
