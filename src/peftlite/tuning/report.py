"""summary(model): what trains, layer by layer, and the totals.

Each adapted layer's row lists its adapters with their ranks, the active ones starred (``a*:8 b:4``):
what the forward computes and, after ``peftlite.use``, what trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..layers import AdaptedLayer, adapted_layers
from ..layers.registry import plain_type
from . import partition


@dataclass(frozen=True)
class Row:
    name: str
    type: str
    shape: str
    rank: str
    trainable: int
    adapters: str = "-"  # "name:rank" per adapter, active ones starred


@dataclass
class Summary:
    """Per-layer trainable report. ``total`` and ``trainable`` count parameters (elements)."""

    rows: list[Row]
    total: int
    trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        head = ("name", "type", "shape", "rank", "adapters", "trainable")
        body = [(r.name or "(root)", r.type, r.shape, r.rank, r.adapters, f"{r.trainable:,}") for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(c.ljust(w) if i < 5 else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        out = [line(head), line(tuple("-" * w for w in widths))] + [line(b) for b in body]
        out.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.2f}%)")
        return "\n".join(out + self.notes)

    def __repr__(self) -> str:
        return f"Summary(total={self.total}, trainable={self.trainable}, layers={len(self.rows)})"


def _shape(module: nn.Module) -> str:
    w = module._parameters.get("weight", module._parameters.get("in_proj_weight"))
    return "x".join(map(str, w.shape)) if w is not None else "-"


def summary(model: nn.Module, blocks: bool = False) -> Summary:
    """Build the trainable report for any model (wrapped or not).

    Args:
        model: any nn.Module.
        blocks: also list the model's blocks (``peftlite.blocks``), input to output, as
            ``param_groups(layer_decay=...)`` scales them; they are added to ``notes``.
    """
    rows = []
    inside = {id(p) for _, m in adapted_layers(model) for p in m.lora.modules()}  # counted with their layer
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, AdaptedLayer):
            n = sum(p.numel() for p in m.lora.parameters() if p.requires_grad)
            n += sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
            ranks = {a: next(iter(p.values())).rank for a, p in m.adapters().items()}
            active = m.adapter_state.active
            listed = " ".join(f"{a}{'*' if a in active else ''}:{r}" for a, r in ranks.items())
            rank = ",".join(str(r) for a, r in ranks.items() if a in active) or "-"
            state = " merged" if m.adapter_state.merged else ""
            rows.append(Row(name, f"{m.base_class.__name__} (lora{state})", _shape(m), rank, n, listed))
            continue
        own = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
        if own:
            rows.append(Row(name, plain_type(m).__name__, _shape(m), "-", own))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Summary(rows, total, trainable, _block_notes(model) if blocks else [])


def _block_notes(model: nn.Module) -> list[str]:
    found = partition.blocks(model)
    params = dict(model.named_parameters())
    out = [f"blocks for layer_decay, input -> output ({len(found)}):"]
    for i, b in enumerate(found):
        n = sum(params[p].numel() for p in b.params)
        t = sum(params[p].numel() for p in b.params if params[p].requires_grad)
        out.append(f"  {i:>3}  {b.name}  ({n:,} parameters, {t:,} trainable)")
    return out
