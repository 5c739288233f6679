"""The adapter file's configuration: what to write for each layer and head, and how to read it back.

It is JSON text under the safetensors metadata key ``"peftlite"``; docs/file-format.md specifies it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from . import functional as F_
from .layers import DEFAULT_ADAPTER, Adapted, kind_of

FORMAT = "peftlite-adapter"
FORMAT_VERSION = 1


def layer_geometry(module: nn.Module) -> dict[str, Any]:
    """What fixes the adapted weight's meaning: enough to rebuild the layer or convert its adapter."""
    kind = kind_of(module)
    if kind.name == "conv2d":
        g = dataclasses.asdict(F_.ConvGeometry.of(module))
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
    if kind.name == "linear":
        return {"in_features": module.in_features, "out_features": module.out_features}
    return {"embed_dim": module.embed_dim, "num_heads": module.num_heads, "kdim": module.kdim, "vdim": module.vdim}


def layer_entry(module: Adapted) -> dict[str, Any]:
    pairs = module.lora_pairs()
    first = next(iter(pairs.values()))
    return {"kind": module._lora_kind, "rank": first.rank, "alpha": first.alpha, "dropout": first.dropout,
            "slots": list(pairs), "base_class": module._lora_base.__name__, **layer_geometry(module)}


def head_entry(module: nn.Module) -> dict[str, Any]:
    """Enough to re-create a Linear or Conv2d head; other head types are passed again with ``heads=``."""
    if type(module) is nn.Linear:
        return {"type": "Linear", "bias": module.bias is not None, **layer_geometry(module)}
    if type(module) is nn.Conv2d:
        return {"type": "Conv2d", "bias": module.bias is not None, **layer_geometry(module)}
    return {"type": f"{type(module).__module__}.{type(module).__qualname__}"}


def build_head(entry: dict[str, Any]) -> nn.Module | None:
    """Re-create a head from its entry, or None for a type that must be passed with ``heads=``."""
    if entry["type"] == "Linear":
        return nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"])
    if entry["type"] == "Conv2d":
        padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
        return nn.Conv2d(entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"]),
                         tuple(entry["stride"]), padding, tuple(entry["dilation"]), entry["groups"],
                         entry["bias"], entry["padding_mode"])
    return None


def adapter_shapes(name: str, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes that adapting ``module`` with ``rank`` would add."""
    kind = kind_of(module)
    slots = kind.slots(module)
    shapes = {}
    for slot in slots:
        w = module._parameters[slot]
        prefix = f"{name}.lora.{DEFAULT_ADAPTER}" + ("" if slots == ("weight",) else f".{slot}")
        shapes[f"{prefix}.A"] = (rank, w[0].numel())
        shapes[f"{prefix}.B"] = (w.shape[0], rank)
    return shapes


def check_layer(name: str, module: nn.Module | None, entry: dict[str, Any]) -> None:
    """Raise ValueError if the model's module is not the layer the file's entry describes."""
    if module is None:
        raise ValueError(f"the adapter file has a layer {name!r} that the model does not have")
    kind = kind_of(module)
    if kind is None or kind.name != entry.get("kind"):
        raise ValueError(f"{name}: the file adapts a {entry.get('kind')} layer, but the model's {name} is a "
                         f"{type(module).__name__}")
    mine = layer_geometry(module)
    # null: not recorded (a conv converted from a PEFT file has no stride/padding/dilation/padding_mode)
    theirs = {k: entry.get(k, "missing") for k in mine}
    theirs = {k: mine[k] if v is None else v for k, v in theirs.items()}
    if mine != theirs:
        diff = ", ".join(f"{k}: file {theirs[k]!r}, model {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        raise ValueError(f"{name}: the file's layer geometry differs from the model's ({diff})")

