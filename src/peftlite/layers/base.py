"""What every adapted layer has: the low-rank pair, the per-layer state, and the adapter protocol.

An adapted layer is the user's own module object with its class swapped to a peftlite subclass
(``nn.Linear`` -> ``LoraLinear``). Its base parameters stay where they were (``_parameters["weight"]``),
so no state_dict key changes; the pairs are added beside them under ``lora.<adapter name>``
(``layer4.0.conv1.lora.default.A``). ``AdaptedLayer`` is the protocol the rest of peftlite (merging,
files, summary, the toolkit) reads; nothing outside ``layers`` touches a private attribute of a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import functional
from ._guard import guard

DEFAULT_ADAPTER = "default"


class LowRank(nn.Module):
    """One low-rank pair for one weight: ΔW = B @ A, applied with ``scale = alpha / rank``.

    A: (rank, fan_in), Kaiming-uniform. B: (fan_out, rank), zeros, so the layer starts as the base.
    """

    def __init__(self, rank: int, fan_in: int, fan_out: int, alpha: float, dropout: float,
                 *, device=None, dtype=None):
        super().__init__()
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.A = nn.Parameter(torch.empty(rank, fan_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(fan_out, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, fan_in={self.A.shape[1]}, "
                f"fan_out={self.B.shape[0]}")


@dataclass
class LayerState:
    """Explicit per-layer adapter state. Only ``merged`` travels in the state_dict (``_extra_state``)."""

    active: str = DEFAULT_ADAPTER  # the adapter the layer computes with
    enabled: bool = True  # False inside ``peftlite.disabled``: the base layer's behaviour
    merged: bool = False
    # slot -> the record that makes unmerge bit-exact; empty when the merged state came from a state_dict
    records: dict = field(default_factory=dict)

    @property
    def computes_adapter(self) -> bool:
        """Does the forward add the adapter itself (enabled and not folded into the weight)?"""
        return self.enabled and not self.merged


class AdaptedLayer:
    """The adapter protocol, and the mixin placed before the base class of every adapted layer.

    Class attributes:
        adapter_kind: ``"linear"``, ``"conv2d"`` or ``"mha"``.
        base_class: the class the module had before ``wrap`` (``unwrap`` gives it back).
    Instance attributes:
        lora: ``nn.ModuleDict`` adapter name -> ``LowRank`` (one adapted weight) or ``nn.ModuleDict``
            slot -> ``LowRank`` (several, e.g. ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``).
        adapter_state: the ``LayerState``.
    """

    adapter_kind: ClassVar[str]
    base_class: ClassVar[type]
    lora: nn.ModuleDict
    adapter_state: LayerState

    def adapters(self) -> dict[str, dict[str, LowRank]]:
        """Every adapter of the layer: ``{adapter name: {adapted parameter name: LowRank}}``."""
        return {name: ({"weight": p} if isinstance(p, LowRank) else dict(p.items())) for name, p in self.lora.items()}

    def active_pairs(self) -> dict[str, LowRank]:
        """The active adapter's pairs, by the parameter name they adapt (``{"weight": LowRank}``)."""
        pairs = self.lora[self.adapter_state.active]
        return {"weight": pairs} if isinstance(pairs, LowRank) else dict(pairs.items())

    def get_extra_state(self) -> Tensor:
        # The merged flag travels with the state_dict, so a merged checkpoint is never merged twice.
        return torch.tensor([int(self.adapter_state.merged)], dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        merged = bool(int(torch.as_tensor(state).reshape(-1)[0]))
        # The weights were just replaced by the loaded ones: any exact-unmerge record is stale.
        self.adapter_state.records.clear()
        self.adapter_state.merged = merged


def effective_weight_property(slot: str) -> property:
    """A class property for parameter ``slot`` that returns ``W + scale·ΔW`` while the adapter is computed.

    Code that reads the weight instead of calling the layer (torchvision's Swin, ``nn.MultiheadAttention``,
    a subclass with its own forward) sees the adapter, so it is never bypassed. The raw parameter is
    returned while merged, disabled, or before the layer's state exists.
    """

    def get(self):
        try:
            w = self._parameters[slot]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{slot}'") from None
        state = self.__dict__.get("adapter_state")
        if w is None or state is None or not state.computes_adapter:
            return w
        pair = self.active_pairs().get(slot)
        if pair is None:
            return w
        return guard(functional.effective_weight(w, pair.A, pair.B, pair.scale))

    return property(get, doc=f"``{slot}`` with the adapter applied (W + scale·ΔW) while enabled and unmerged.")


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    """Every adapted layer of ``model`` with its qualified name, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedLayer)]
