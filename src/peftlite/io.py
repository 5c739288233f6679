"""save / load: one safetensors file per adapter, with its configuration in the file's metadata.

Safety: nothing is unpickled; a save is atomic (temporary file, then ``os.replace``); a load checks every
key, shape and dtype before it touches the model, and leaves the model exactly as it was on any error.

dtype policy: a file stores tensors in the dtype they had, or in ``save(dtype=...)``. Loading casts each
tensor to the device and dtype of the tensor it replaces: adapters created by wrap are fp32 (fp64 on an
fp64 base), so a bf16 file loads into fp32 adapters, and new heads take the dtype of the module they
replace.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import _config
from . import targets as targets_
from .layers import Adapted
from .merge import adapted_layers
from .wrap import WrapState, _under, wrap, wrap_state


class AdapterFileError(ValueError):
    """An adapter file that cannot be read: missing, truncated, corrupt, or not a peftlite file."""


# ---- what a wrapped model saves ----------------------------------------------------------------

def saveable(model: nn.Module, state: WrapState) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: adapters, heads, trainable modules, and BatchNorms with train_bn."""
    keep = state.heads + state.trainable
    if state.train_bn:
        keep = keep + [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    out = {}
    for key, t in model.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        if ".lora." in f".{key}" or _under(key.rpartition(".")[0], keep):
            out[key] = t
    return out


def _file_config(model: nn.Module, state: WrapState, partial: bool) -> dict[str, Any]:
    from . import __version__

    return {
        "format": _config.FORMAT, "format_version": _config.FORMAT_VERSION, "peftlite_version": __version__,
        "layers": {name: _config.layer_entry(m) for name, m in adapted_layers(model)},
        "heads": {name: _config.head_entry(model.get_submodule(name)) for name in state.heads},
        "trainable": list(state.trainable), "train_bn": state.train_bn, "partial": partial,
    }


def save(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
         include: str | Sequence[str] | None = None, format: str = "peftlite") -> str:
    """Write the model's adapters, heads and trainable modules to ONE ``.safetensors`` file, atomically.

    Args:
        path: the file to write (its folder must exist); replaced atomically. With ``format="peft"``, a
            directory (see below).
        dtype: store floating tensors in this dtype (``torch.bfloat16`` halves the file).
        include: glob(s) on tensor keys; save only those (e.g. ``"heads.cls*"``). The file is then marked
            partial, and a strict load does not require the keys it leaves out.
        format: ``"peftlite"`` (one file) or ``"peft"``: a Hugging Face PEFT LoRA adapter directory
            (``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
            loads; layers PEFT cannot compute exactly are refused (see peftlite.peft_format).
    Returns:
        the path written.
    """
    if format not in ("peftlite", "peft"):
        raise ValueError(f"save: format must be 'peftlite' or 'peft', got {format!r}")
    state = wrap_state(model)
    if state is None:
        raise ValueError("save: the model is not wrapped; call peftlite.wrap(model, ...) first")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"save: dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    tensors = saveable(model, state)
    patterns = [include] if isinstance(include, str) else list(include or [])
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in tensors):
            raise ValueError(f"save: include pattern {pattern!r} matched no saved tensor; nearest: "
                             f"{', '.join(targets_.nearest(pattern, tensors))}")
    if patterns:
        tensors = {k: t for k, t in tensors.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    if not tensors:
        raise ValueError("save: nothing to save (no adapters, heads or trainable modules)")
    config = _file_config(model, state, bool(patterns))
    if format == "peft":
        from . import peft_format

        peft_tensors, adapter_config = peft_format.to_peft(tensors, config)
        peft_format.check_direct_reads(model, list(config["layers"]))
        return peft_format.write(path, peft_tensors, adapter_config, dtype)
    return write(path, tensors, config, dtype)


def file_tensors(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors as safetensors stores them: detached, on the CPU, contiguous, unaliased, floats in ``dtype``."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict[str, Any],
          dtype: torch.dtype | None = None) -> str:
    """Write tensors and a peftlite config as one safetensors file, atomically."""
    meta = {"format": "pt", "peftlite": json.dumps(config, separators=(",", ":"))}
    return write_safetensors(path, file_tensors(tensors, dtype), meta, "save")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str],
                      what: str) -> str:
    """Save ``tensors`` (as ``file_tensors`` prepares them) to a temporary file, fsync, then ``os.replace``.

    A crash never leaves a half-written file under ``path``. ``what`` names the caller in errors.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: folder {folder!r} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".peftlite-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---- reading -----------------------------------------------------------------------------------

def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of a peftlite adapter file.

    Raises:
        FileNotFoundError: no such file.
        AdapterFileError: truncated, corrupt, not safetensors, or not a peftlite adapter (names the reason).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    if os.path.isdir(path):
        raise AdapterFileError(f"{path}: is a folder; peftlite adapter files are single .safetensors files")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types, and OSError on short reads
        raise AdapterFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if "peftlite" not in meta:
        raise AdapterFileError(f"{path}: a safetensors file without peftlite metadata; it is not a peftlite "
                               "adapter file")
    try:
        config = json.loads(meta["peftlite"])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: corrupt peftlite metadata ({e})") from None
    if not isinstance(config, dict) or config.get("format") != _config.FORMAT:
        raise AdapterFileError(f"{path}: metadata is not a {_config.FORMAT} config")
    if int(config.get("format_version", 0)) > _config.FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format version {config.get('format_version')} is newer than this "
                               f"peftlite reads ({_config.FORMAT_VERSION}); upgrade peftlite")
    for key in ("layers", "heads", "trainable", "train_bn"):
        if key not in config:
            raise AdapterFileError(f"{path}: peftlite metadata lacks {key!r}")
    return tensors, config


def _compare(path, expected: Mapping[str, tuple], found: Mapping[str, torch.Tensor], strict: bool,
             partial: bool) -> None:
    """Check keys, shapes and dtypes; raise before anything is changed."""
    unexpected = [k for k in found if k not in expected]
    missing = [k for k in expected if k not in found]
    if strict and unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensor(s) the model has no place for: "
                         f"{', '.join(unexpected[:5])}; pass strict=False to ignore them")
    if strict and missing and not partial:
        raise ValueError(f"{path}: {len(missing)} tensor(s) missing from the file: {', '.join(missing[:5])}; "
                         "pass strict=False to keep their current values")
    for key, (shape, is_float) in expected.items():
        t = found.get(key)
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)} in the file, but the model expects "
                             f"{tuple(shape)} (a different rank or layer size?)")
        if t.is_floating_point() != is_float:
            raise ValueError(f"{path}: {key} is {t.dtype} in the file, but the model holds a "
                             f"{'floating' if is_float else 'non-floating'} tensor there")


def _fresh_plan(model: nn.Module, config: dict, heads: Mapping[str, nn.Module] | None):
    """For an unwrapped model: the expected tensors, the head modules and the wrap calls to make."""
    heads = dict(heads or {})
    unknown = [n for n in heads if n not in config["heads"]]
    if unknown:
        raise ValueError(f"heads={unknown} are not heads in the file (it has {list(config['heads'])})")
    built = {}
    for name, entry in config["heads"].items():
        built[name] = heads.get(name) or _config.build_head(entry)
        if built[name] is None:
            raise ValueError(f"head {name!r} is a {entry['type']}, which load cannot re-create; pass it again: "
                             f"load(model, path, heads={{{name!r}: module}})")
    modules = dict(model.named_modules())
    expected: dict[str, tuple] = {}
    groups: dict[tuple, list[str]] = {}
    for name, entry in config["layers"].items():
        if _under(name, list(built)):
            raise ValueError(f"the file adapts {name!r}, which lies under a head it replaces")
        module = modules.get(name)
        _config.check_layer(name, module, entry)
        for key, shape in _config.adapter_shapes(name, module, int(entry["rank"])).items():
            expected[key] = (shape, True)
        hparams = (int(entry["rank"]), float(entry["alpha"]), float(entry.get("dropout", 0.0)))
        groups.setdefault(hparams, []).append(name)
    for name, head in built.items():
        if name not in modules:
            raise ValueError(f"the file has a head {name!r}, but the model has no module of that name to replace")
        expected.update({f"{name}.{k}": (tuple(v.shape), v.is_floating_point()) for k, v in head.state_dict().items()})
    keep = list(config["trainable"])
    if config["train_bn"]:
        keep += [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in keep:
        if name not in modules:
            raise ValueError(f"the file trains module {name!r}, which the model does not have")
        if _under(name, list(built)):
            continue
        for k, v in modules[name].state_dict().items():
            if not k.endswith("_extra_state") and ".lora." not in f".{k}":
                expected[f"{name}.{k}" if name else k] = (tuple(v.shape), v.is_floating_point())
    return expected, built, groups


def _copy_in(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    current = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in tensors.items():
            if key in current:
                current[key].copy_(value)


def load(model: nn.Module, path: str | os.PathLike, heads: Mapping[str, nn.Module] | None = None,
         strict: bool = True) -> nn.Module:
    """Load an adapter file into ``model`` and return the model.

    ``path`` may also be a Hugging Face PEFT LoRA adapter directory (see peftlite.peft_format); its
    ``modules_to_save`` become peftlite ``trainable`` modules.

    Into an unwrapped base model, it wraps the model as the file says (re-creating Linear/Conv2d heads;
    other head types are passed again with ``heads=``). Into a model wrapped the same way, it loads the
    values. Tensors are cast to the device and dtype of the tensors they replace.

    Raises:
        FileNotFoundError / AdapterFileError: the file cannot be read (the model is unchanged).
        ValueError: keys, shapes or dtypes do not fit the model (names the key, expected and found shapes).
    """
    if os.path.isdir(path):  # a Hugging Face PEFT adapter directory
        from . import peft_format

        tensors, config = peft_format.read(path, model)
    else:
        tensors, config = read(path)
    partial = bool(config.get("partial", False))
    for name, entry in config["layers"].items():
        if not isinstance(entry, dict) or "rank" not in entry or "kind" not in entry:
            raise AdapterFileError(f"{path}: layer entry {name!r} is malformed")
    state = wrap_state(model)
    if state is None:
        expected, built, groups = _fresh_plan(model, config, heads)
        _compare(path, expected, tensors, strict, partial)
        first = True
        for (rank, alpha, dropout), names in groups.items():
            wrap(model, names, rank=rank, alpha=alpha, dropout=dropout, heads=built if first else None,
                 trainable=config["trainable"] if first else None, train_bn=config["train_bn"])
            first = False
        if first:  # head-only / trainable-only file
            wrap(model, None, heads=built, trainable=config["trainable"], train_bn=config["train_bn"])
    else:
        if heads:
            raise ValueError("heads= is only for loading into an unwrapped model; this model is already wrapped")
        merged = [n for n, m in adapted_layers(model) if m._lora_state.merged]
        if merged:
            raise ValueError(f"load: the model is merged ({merged[0]}, ...); call peftlite.unmerge(model) first")
        current = saveable(model, state)
        expected = {k: (tuple(t.shape), t.is_floating_point()) for k, t in current.items()}
        _compare(path, expected, tensors, strict, partial)
        modules = dict(model.named_modules())
        for name, entry in config["layers"].items():  # noqa: B007
            if name not in modules or not isinstance(modules[name], Adapted):
                if strict:
                    raise ValueError(f"{path}: the file adapts {name!r}, which is not adapted in this model")
                continue
            _config.check_layer(name, modules[name], entry)
    _copy_in(model, tensors)
    modules = dict(model.named_modules())
    for name, entry in config["layers"].items():  # the file's alpha is the scale its values were trained at
        module = modules.get(name)
        if isinstance(module, Adapted):
            for pair in module.lora_pairs().values():
                pair.alpha = float(entry["alpha"])
    return model
