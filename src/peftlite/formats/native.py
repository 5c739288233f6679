"""save / load: one safetensors file per adapter, with its configuration in the file's metadata.

Safety: nothing is unpickled; a save is atomic (temporary file, then ``os.replace``); a load checks every
key, shape and dtype before it touches the model, and on any error, even one raised while the values
are being copied in, leaves the model exactly as it was.

dtype policy: a file stores tensors in the dtype they had, or in ``save(dtype=...)``. Loading casts each
tensor to the device and dtype of the tensor it replaces: adapters created by wrap are fp32 (fp64 on an
fp64 base), so a bf16 file loads into fp32 adapters, and new heads take the dtype of the module they
replace.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import selection
from .._version import __version__
from ..layers import DEFAULT_ADAPTER, AdaptedLayer, adapted_layers, registry
from ..wrapping import (
    WrapState,
    apply_active,
    apply_adapter_grads,
    check_name,
    saved_tensors,
    under,
    unwrap,
    wrap,
    wrap_state,
)
from . import peft, schema
from ._safetensors import file_tensors, read_file, write_file
from .schema import AdapterFileError

METADATA_KEY = "peftlite"


def model_config(model: nn.Module, state: WrapState, adapter: str | None, partial: bool) -> dict[str, Any]:
    """The file config of a wrapped model's adapter ``adapter`` (None: no adapter, heads only)."""
    layers = {} if adapter is None else {n: schema.layer_entry(m, adapter) for n, m in adapted_layers(model)
                                         if adapter in m.lora and not all(p.off for p in m.pairs(adapter).values())}
    return schema.file_config(
        layers, {name: schema.head_entry(model.get_submodule(name)) for name in state.heads},
        state.trainable, state.train_bn, partial, adapter=adapter or DEFAULT_ADAPTER, peftlite_version=__version__,
    )


def _which(state: WrapState, name: str | None, what: str) -> str | None:
    """The adapter a file holds: ``name``, or the model's only adapter (None for a model without any)."""
    if name is not None:
        if name not in state.adapters:
            raise KeyError(f"{what}: no adapter named {name!r}; the model has {', '.join(map(repr, state.adapters))}")
        return name
    if len(state.adapters) > 1:
        shown = ", ".join(map(repr, state.adapters))
        raise ValueError(f"{what}: the model has {len(state.adapters)} adapters ({shown}) and a file holds one; "
                         "pass name=")
    return state.adapters[0] if state.adapters else None


def save(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
         include=None, format: str = "peftlite", name: str | None = None) -> str:
    """Write one adapter of the model, with the heads and trainable tensors, to ONE ``.safetensors`` file.

    Args:
        path: the file to write (its folder must exist); replaced atomically. With ``format="peft"``, a
            directory (see below).
        dtype: store floating tensors in this dtype (``torch.bfloat16`` halves the file).
        include: pattern(s) selecting the tensors to save (``"fc"``, ``"heads.cls"``, ``"*.lora.*"``;
            the one pattern language). The file is then marked partial, and a strict load does not
            require the keys it leaves out.
        format: ``"peftlite"`` (one file) or ``"peft"``: a Hugging Face PEFT LoRA adapter directory
            (``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
            loads; layers PEFT cannot compute exactly are refused (``PeftFormatError``).
        name: the adapter to save; may be left out when the model has one. Heads and trainable tensors,
            shared by all adapters, go into every file.
    Returns:
        the path written.
    Raises:
        ValueError: several adapters and no ``name``; nothing to save; bad arguments.
        KeyError: an unknown ``name``.
    """
    if format not in ("peftlite", "peft"):
        raise ValueError(f"save: format must be 'peftlite' or 'peft', got {format!r}")
    state = wrap_state(model)
    if state is None:
        raise ValueError("save: the model is not wrapped; call peftlite.wrap(model, ...) first")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"save: dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    adapter = _which(state, name, "save")
    tensors = saved_tensors(model, state, [adapter] if adapter else [])
    if include is not None:
        keep = set(selection.select_tensors(model, include, "save include", names=list(tensors)))
        tensors = {k: t for k, t in tensors.items() if k in keep}
    if not tensors:
        raise ValueError("save: nothing to save (no adapters, heads or trainable modules)")
    config = model_config(model, state, adapter, include is not None)
    if format == "peft":
        peft_tensors, adapter_config = peft.to_peft(tensors, config)
        peft.check_direct_reads(model, list(config["layers"]))
        return peft.write(path, peft_tensors, adapter_config, dtype)
    return write(path, tensors, config, dtype)


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict[str, Any],
          dtype: torch.dtype | None = None) -> str:
    """Write tensors and a peftlite config as one safetensors file, atomically."""
    meta = {"format": "pt", METADATA_KEY: json.dumps(config, separators=(",", ":"))}
    return write_file(path, file_tensors(tensors, dtype), meta, "save")


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of a peftlite adapter file.

    Raises:
        FileNotFoundError: no such file.
        AdapterFileError: truncated, corrupt, not safetensors, or not a peftlite adapter (names the reason).
    """
    path = os.fspath(path)
    tensors, meta = read_file(path)
    if METADATA_KEY not in meta:
        raise AdapterFileError(f"{path}: a safetensors file without peftlite metadata; it is not a peftlite "
                               "adapter file")
    try:
        config = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: corrupt peftlite metadata ({e})") from None
    return tensors, schema.validate(config, path)


def read_any(path: str | os.PathLike, model: nn.Module | None = None, name: str | None = None):
    """``(format, tensors, config)`` of a peftlite file or a PEFT directory (adapter ``name``'s subfolder
    when it has one), checked against ``model``."""
    if os.path.isdir(path):
        return "peft", *peft.read(path, model, name)
    return "peftlite", *read(path)


# ---- loading ------------------------------------------------------------------------------------

def _compare(path, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], strict: bool,
             partial: bool) -> None:
    """Check the file's keys, shapes and dtype kinds against the tensors they would replace."""
    unexpected = [k for k in found if k not in expected]
    missing = [k for k in expected if k not in found]
    if strict and unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensor(s) the model has no place for: "
                         f"{', '.join(unexpected[:5])}; pass strict=False to ignore them")
    if strict and missing and not partial:
        raise ValueError(f"{path}: {len(missing)} tensor(s) missing from the file: {', '.join(missing[:5])}; "
                         "pass strict=False to keep their current values")
    for key, current in expected.items():
        t = found.get(key)
        if t is None:
            continue
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)} in the file, but the model expects "
                             f"{tuple(current.shape)} (a different rank or layer size?)")
        if t.is_floating_point() != current.is_floating_point():
            raise ValueError(f"{path}: {key} is {t.dtype} in the file, but the model holds a "
                             f"{'floating' if current.is_floating_point() else 'non-floating'} tensor there")


def _check_fresh(model: nn.Module, config: dict, heads: Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
    """For an unwrapped model: check the file's layers, heads and trainable names; return the heads to put in."""
    heads = dict(heads or {})
    unknown = [n for n in heads if n not in config["heads"]]
    if unknown:
        raise ValueError(f"heads={unknown} are not heads in the file (it has {list(config['heads'])})")
    modules = dict(model.named_modules())
    built = {}
    for name, entry in config["heads"].items():
        if name not in modules:
            raise ValueError(f"the file has a head {name!r}, but the model has no module of that name to replace")
        built[name] = heads.get(name) or schema.build_head(entry)
        if built[name] is None:
            raise ValueError(f"head {name!r} is a {entry['type']}, which load cannot re-create; pass it again: "
                             f"load(model, path, heads={{{name!r}: module}})")
    for name, entry in config["layers"].items():
        if under(name, list(built)):
            raise ValueError(f"the file adapts {name!r}, which lies under a head it replaces")
        schema.check_layer(name, modules.get(name), entry)
    params = dict(model.named_parameters())
    for name in config["trainable"]:
        if name not in modules and name not in params:
            raise ValueError(f"the file trains {name!r}, which the model does not have")
    return built


def _wrap_as_file(model: nn.Module, config: dict, built: dict[str, nn.Module]) -> None:
    """Wrap an unwrapped model as the file says: one wrap call per (rank, alpha, dropout)."""
    groups: dict[tuple, list[str]] = {}
    for name, entry in config["layers"].items():
        groups.setdefault(_hparams(entry), []).append(name)
    trainable = list(config["trainable"]) or None
    first = {"heads": built or None, "trainable": trainable}
    for (rank, alpha, dropout, variant, rank_scaling), names in groups.items():
        chosen = set(names)
        wrap(model, lambda n, m, chosen=chosen: n in chosen, rank=rank, alpha=alpha, dropout=dropout,
             train_bn=config["train_bn"], name=schema.adapter_name(config), variant=variant,
             rank_scaling=rank_scaling, **first)
        first = {}
    if first:  # a head-only or trainable-only file
        wrap(model, None, train_bn=config["train_bn"], **first)


def _hparams(entry: dict) -> tuple:
    """(rank, alpha, dropout, variant, rank_scaling) of a layer entry: what ``wrap`` needs to rebuild it."""
    return (entry["rank"], float(entry["alpha"]), float(entry.get("dropout", 0.0)), entry.get("variant", "lora"),
            entry.get("rank_scaling", "linear"))


def _copy_in(model: nn.Module, tensors: Mapping[str, torch.Tensor], layers: dict, adapter: str) -> None:
    current = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in tensors.items():
            if key in current:
                current[key].copy_(value)
    modules = dict(model.named_modules())
    for name, entry in layers.items():  # the file's alpha is the scale its values were trained at
        module = modules.get(name)
        if isinstance(module, AdaptedLayer) and adapter in module.lora:
            for pair in module.pairs(adapter).values():
                pair.alpha, pair.rank_scaling = float(entry["alpha"]), entry.get("rank_scaling", "linear")


def load(model: nn.Module, path: str | os.PathLike, heads: Mapping[str, nn.Module] | None = None,
         strict: bool = True, name: str | None = None) -> nn.Module:
    """Load an adapter file into ``model`` and return the model.

    ``path`` may also be a Hugging Face PEFT LoRA adapter directory (see ``peft``; a directory that holds
    several adapters in subfolders, as PEFT writes them, loads ``name``'s); its ``modules_to_save``
    become peftlite ``trainable`` modules.

    - Into an unwrapped base model, it wraps the model as the file says (re-creating Linear/Conv2d heads;
      other head types are passed again with ``heads=``).
    - Into a wrapped model that has an adapter of that name, it loads the values into it.
    - Into a wrapped model without one, it adds the adapter, inactive (``peftlite.use`` switches), and
      leaves the others untouched, merged or not. The file's heads and trainable tensors, shared by all
      adapters, are loaded too (a warning says when their values change).

    The adapter takes ``name`` (default: the name it was saved under). Tensors are cast to the device and
    dtype of the tensors they replace. All or nothing: on any error the model is left exactly as it was.

    Raises:
        FileNotFoundError / AdapterFileError: the file cannot be read (the model is unchanged).
        ValueError: keys, shapes or dtypes do not fit the model (names the key, expected and found shapes).
    """
    if name is not None:
        check_name(name, "load")
    _, tensors, config = read_any(path, model, name)
    adapter = name or schema.adapter_name(config)
    tensors, config = schema.renamed(tensors, config, adapter)
    partial = bool(config.get("partial", False))
    state = wrap_state(model)
    if state is None:
        built = _check_fresh(model, config, heads)
        replaced = {n: model.get_submodule(n) for n in built}
        try:
            _wrap_as_file(model, config, built)
            _compare(path, saved_tensors(model, wrap_state(model), [adapter]), tensors, strict, partial)
            _copy_in(model, tensors, config["layers"], adapter)
        except BaseException:
            _undo_wrap(model, replaced)
            raise
        return model
    if heads:
        raise ValueError("heads= is only for loading into an unwrapped model; this model is already wrapped")
    if adapter in state.adapters or not config["layers"]:  # an adapter the model has, or heads only
        return _load_values(model, path, tensors, config, adapter, strict, partial)
    return _load_new(model, path, tensors, config, adapter, strict, partial)


def _check_layers(model: nn.Module, path, config: dict, adapter: str, strict: bool, new: bool) -> None:
    modules = dict(model.named_modules())
    state = wrap_state(model)
    for name, entry in config["layers"].items():
        module = modules.get(name)
        if new:
            if under(name, state.heads):
                raise ValueError(f"{path}: the file adapts {name!r}, which lies under the head {name!r} replaces")
            schema.check_layer(name, module, entry)
            registry.check_adaptable(name, module, adapter)
        elif not isinstance(module, AdaptedLayer) or adapter not in module.lora:
            if strict:
                raise ValueError(f"{path}: the file adapts {name!r}, which has no adapter {adapter!r} in this model")
        else:
            schema.check_layer(name, module, entry)


def _load_values(model, path, tensors, config, adapter, strict, partial) -> nn.Module:
    """Load the file's values into the model's adapter ``adapter`` (and its heads), all or nothing."""
    merged = [n for n, m in adapted_layers(model) if m.adapter_state.merged and adapter in m.adapter_state.active]
    if merged:
        raise ValueError(f"load: adapter {adapter!r} is merged into the weights ({merged[0]}, ...); call "
                         "peftlite.unmerge(model) first")
    current = saved_tensors(model, wrap_state(model), [adapter])
    _compare(path, current, tensors, strict, partial)
    _check_layers(model, path, config, adapter, strict, new=False)
    backup = {k: current[k].detach().clone() for k in tensors if k in current}
    pairs = [p for _, m in adapted_layers(model) if adapter in m.lora for p in m.pairs(adapter).values()]
    alphas = [(p.alpha, p.rank_scaling) for p in pairs]
    try:
        _copy_in(model, tensors, config["layers"], adapter)
    except BaseException:
        _copy_in(model, backup, {}, adapter)
        for p, (alpha, rank_scaling) in zip(pairs, alphas, strict=True):
            p.alpha, p.rank_scaling = alpha, rank_scaling
        raise
    return model


def _load_new(model, path, tensors, config, adapter, strict, partial) -> nn.Module:
    """Add the file's adapter to a wrapped model as a new, inactive adapter ``adapter``, all or nothing."""
    state = wrap_state(model)
    _check_layers(model, path, config, adapter, strict, new=True)
    modules = dict(model.named_modules())
    shared = {k: t.detach().clone() for k, t in saved_tensors(model, state, [adapter]).items()}  # heads: no adapter yet
    try:
        for lname, entry in config["layers"].items():
            module = modules[lname]
            rank, alpha, dropout, variant, rank_scaling = _hparams(entry)
            registry.attach(module, registry.kind_of(module), rank=rank, alpha=alpha, dropout=dropout,
                            adapter=adapter, variant=variant, rank_scaling=rank_scaling)
        state.adapters.append(adapter)
        apply_active(model, state)
        apply_adapter_grads(model, state)
        _compare(path, saved_tensors(model, state, [adapter]), tensors, strict, partial)
        changed = [k for k, t in shared.items() if k in tensors and not torch.equal(t, tensors[k].to(t))]
        _copy_in(model, tensors, config["layers"], adapter)
    except BaseException:
        _copy_in(model, shared, {}, adapter)
        for _, layer in adapted_layers(model):
            if adapter in layer.lora:
                registry.remove(layer, adapter)
        if adapter in state.adapters:
            state.adapters.remove(adapter)
        apply_active(model, state)
        apply_adapter_grads(model, state)
        raise
    if changed:
        warnings.warn(f"load: heads and trainable tensors are shared by all adapters, and {path} changed "
                      f"{len(changed)} of them ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})",
                      UserWarning, stacklevel=3)
    return model
def _undo_wrap(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Take back a load's wrap of a fresh model: adapters dropped, the modules its heads replaced put back."""
    if wrap_state(model) is not None:
        unwrap(model, merge=False)
    for name, old in replaced.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, old)
