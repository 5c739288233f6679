"""The adapter file's configuration: the one schema, its one validation, and the entries for layers and heads.

peftlite's in-memory file form is ``(tensors, config)``: tensors by state_dict key, and this config (JSON
under the safetensors metadata key ``"peftlite"``; docs/file-format.md specifies it). Native files and
PEFT directories are both translated to and from it, so both are built by ``file_config`` and checked
by ``validate``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..layers import DEFAULT_ADAPTER, AdaptedLayer, registry
from ..layers.spec import KINDS as ADAPTER_KINDS
from ..layers.spec import RANK_SCALINGS, VARIANTS, AdapterSpec, is_positive

FORMAT = "peftlite-adapter"
FORMAT_VERSION = 4  # the newest this reader reads; 2 adds DoRA and rsLoRA layers, 3 LoHa, 4 LoKr (a plain file: 1)
KINDS = tuple(k.name for k in registry.KINDS.values())  # the layer kinds a file may name: the registry's rows


class AdapterFileError(ValueError):
    """An adapter file that cannot be read: missing parts, truncated, corrupt, or not a peftlite/PEFT adapter."""


def file_config(layers: dict[str, dict], heads: dict[str, dict], trainable: list[str], train_bn: bool,
                partial: bool, adapter: str = DEFAULT_ADAPTER, **extra: Any) -> dict[str, Any]:
    """The config of one adapter file (``extra``: ``peftlite_version``, ``source``).

    Its ``format_version`` is the lowest that expresses it: 4 when a layer is LoKr, 3 when one is LoHa, 2 when
    one is DoRA or rsLoRA, so that an older peftlite refuses the file instead of loading it silently wrong; 1
    otherwise.
    """
    kinds = {e.get("adapter_kind", "lora") for e in layers.values()}
    if "lokr" in kinds:
        version = 4
    elif "loha" in kinds:
        version = 3
    elif any(e.get("variant", "lora") != "lora" or e.get("rank_scaling", "linear") != "linear"
             for e in layers.values()):
        version = 2
    else:
        version = 1
    return {"format": FORMAT, "format_version": version, **extra, "adapter": adapter, "layers": layers,
            "heads": heads, "trainable": list(trainable), "train_bn": bool(train_bn), "partial": bool(partial)}


def check_exportable(config: dict[str, Any], where: str, error: type[ValueError], what: str) -> None:
    """Refuse, with ``error``, what no other format's file holds: BatchNorm statistics and partial adapters.
    ``what`` names the format's file ("a PEFT directory")."""
    if config.get("train_bn"):
        raise error(f"{where}: the adapter trains BatchNorm statistics (train_bn=True), which {what} does not hold; "
                    "save it in peftlite format")
    if config.get("partial"):
        raise error(f"{where}: a partial adapter (saved with include=) cannot be written as {what}, which needs "
                    "every tensor of the adapter")


def adapter_name(config: dict[str, Any]) -> str:
    """The name the file's adapter was saved under (files before named adapters: ``"default"``)."""
    return config.get("adapter", DEFAULT_ADAPTER)


def renamed(tensors: dict, config: dict[str, Any], name: str) -> tuple[dict, dict[str, Any]]:
    """The in-memory form with its adapter under ``name``: keys ``<layer>.lora.<old>.`` -> ``.lora.<name>.``."""
    old = adapter_name(config)
    if old == name:
        return tensors, config
    out = {}
    for key, t in tensors.items():
        layer = adapter_layer(key, config["layers"])
        if layer is not None:
            head = f"{layer}.lora." if layer else "lora."
            rest = key[len(head):]
            if rest.startswith(old + "."):
                key = f"{head}{name}.{rest[len(old) + 1:]}"
        out[key] = t
    return out, {**config, "adapter": name}


def validate(config: object, where: str) -> dict[str, Any]:
    """Check a config read from ``where``; returns it, or raises AdapterFileError naming what is wrong."""
    def bad(what: str) -> AdapterFileError:
        return AdapterFileError(f"{where}: {what}")

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise bad(f"metadata is not a {FORMAT} config")
    version = config.get("format_version")
    if not is_positive(version, integral=True):
        raise bad(f"format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise bad(f"format version {version} is newer than this peftlite reads ({FORMAT_VERSION}); upgrade peftlite")
    for key, kind in (("layers", dict), ("heads", dict), ("trainable", list), ("train_bn", bool)):
        if not isinstance(config.get(key), kind):
            raise bad(f"peftlite metadata lacks {key!r} or it is not a {kind.__name__}")
    if not isinstance(config.get("partial", False), bool):
        raise bad(f"partial is {config['partial']!r}, not true or false")
    for name, entry in config["layers"].items():
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise bad(f"layer entry {name!r} is malformed (no kind among {', '.join(KINDS)})")
        if not is_positive(entry.get("rank"), integral=True) or not is_positive(entry.get("alpha")):
            raise bad(f"layer {name!r} has rank {entry.get('rank')!r} and alpha {entry.get('alpha')!r}; both must "
                      "be positive")
        dropout = entry.get("dropout", 0.0)
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise bad(f"layer {name!r} has dropout {dropout!r}, not a probability in [0, 1)")
        for field, known in (("variant", VARIANTS), ("rank_scaling", RANK_SCALINGS), ("adapter_kind", ADAPTER_KINDS)):
            if entry.get(field, known[0]) not in known:
                raise bad(f"layer {name!r} has {field} {entry.get(field)!r}; this peftlite knows "
                          f"{', '.join(map(repr, known))}")
        slots = entry.get("slots", ["weight"])
        if not isinstance(slots, list) or not all(isinstance(s, str) for s in slots):
            raise bad(f"layer {name!r} has slots {slots!r}, not a list of names")
    for name, entry in config["heads"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise bad(f"head entry {name!r} is malformed (no type)")
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated, however large the entry says
                build_head(entry)
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise bad(f"head {name!r} cannot be built from its entry ({type(e).__name__}: {e})") from None
    if not all(isinstance(t, str) for t in config["trainable"]):
        raise bad("trainable holds a name that is not a string")
    name = config.get("adapter", DEFAULT_ADAPTER)
    if not isinstance(name, str) or not name or "." in name:
        raise bad(f"adapter name {name!r} is not a non-empty string without dots")
    return config


def check_shapes(config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise AdapterFileError if an adapter tensor contradicts its layer's rank: A is (rank, ...), B (..., rank)."""
    for key, shape in shapes.items():
        layer = adapter_layer(key, config["layers"])
        part = key.rpartition(".")[2]
        if layer is None or part.rstrip("12") not in ("A", "B"):
            continue
        rank = config["layers"][layer]["rank"]
        if len(shape) != 2 or shape[0 if part.startswith("A") else 1] != rank:
            raise AdapterFileError(f"{where}: {key} has shape {tuple(shape)}, but its layer {layer!r} has rank "
                                   f"{rank} (A is (rank, fan_in), B (out, rank)); the file contradicts itself")


# ---- entries --------------------------------------------------------------------------------------

def layer_geometry(module: nn.Module) -> dict[str, Any]:
    """What fixes the adapted weight's meaning: enough to rebuild the layer or convert its adapter."""
    return registry.kind_of(module).geometry(module)


def layer_entry(module: AdaptedLayer, adapter: str) -> dict[str, Any]:
    """The config entry of one adapter of an adapted layer."""
    pairs = module.pairs(adapter)
    specs = {p.spec for p in pairs.values()}
    spec = next(iter(pairs.values())).spec
    if len(specs) > 1:  # LoKr on attention's q/k/v of other widths: each slot split by the rule, kept instead
        spec = spec.replace(kron=None, full=None)
    return {"kind": module.adapter_kind, **spec.entry(), "slots": list(pairs), "base_class": module.base_class.__name__,
            **layer_geometry(module)}


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


def adapter_keys(name: str, module: nn.Module, spec: AdapterSpec,
                 adapter: str = DEFAULT_ADAPTER) -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes that adapting ``module`` (at ``name``) with ``spec`` adds, as the pair
    classes allocate them (``registry.pair_shapes``).

    Raises:
        ValueError: a spec that does not fit the module (a LoKr split that does not divide its dimensions).
    """
    shapes = registry.pair_shapes(module, spec)
    out = {}
    for slot, params in shapes.items():
        prefix = f"{name}.lora.{adapter}" + ("" if list(shapes) == ["weight"] else f".{slot}")
        out.update({f"{prefix}.{param}": shape for param, shape in params.items()})
    return out


def adapter_layer(key: str, layers: dict[str, Any]) -> str | None:
    """The layer of ``layers`` (a config's) that adapter tensor ``key`` belongs to; None for other tensors."""
    for name in layers:
        if key.startswith(f"{name}.lora." if name else "lora."):
            return name
    return None


def check_layer(name: str, module: nn.Module | None, entry: dict[str, Any], where: str | None = None) -> None:
    """Raise ValueError if the model's module is not the layer the file's entry describes (``where``: the file)."""
    file = f"{where}: " if where else ""
    if module is None:
        raise ValueError(f"{file}the adapter file has a layer {name!r} that the model does not have")
    kind = registry.kind_of(module)
    if kind is None or kind.name != entry.get("kind"):
        raise ValueError(f"{file}{name}: the file adapts a {entry.get('kind')} layer, but the model's {name} is a "
                         f"{type(module).__name__}")
    slots = list(kind.slots(module))
    if entry.get("slots", slots) != slots:
        raise ValueError(f"{file}{name}: the file adapts the slots {entry['slots']!r}, but the model's {name} has "
                         f"{slots!r}")
    mine = layer_geometry(module)
    # null: not recorded (a conv converted from a PEFT file has no stride/padding/dilation/padding_mode)
    theirs = {k: entry.get(k, "missing") for k in mine}
    theirs = {k: mine[k] if v is None else v for k, v in theirs.items()}
    if mine != theirs:
        diff = ", ".join(f"{k}: file {theirs[k]!r}, model {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        raise ValueError(f"{file}{name}: the file's layer geometry differs from the model's ({diff})")
