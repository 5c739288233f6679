"""save / load: one safetensors file per adapter, with its configuration in the file's metadata.

Safety: nothing is unpickled; a save is atomic (temporary file, then ``os.replace``); a load checks every
key, shape and dtype (from the file's header) before it touches the model, then reads the file one tensor
at a time as it copies the values in, refusing NaN and Inf in adapter tensors; on any error, even one
raised while the values are being copied in, it leaves the model exactly as it was.

dtype policy: a file stores tensors in the dtype they had, or in ``save(dtype=...)``. Loading casts each
tensor to the device and dtype of the tensor it replaces: adapters created by wrap are fp32 (fp64 on an
fp64 base), so a bf16 file loads into fp32 adapters, and new heads take the dtype of the module they
replace.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import selection
from .._version import __version__
from ..layers import DEFAULT_ADAPTER, AdaptedLayer, adapted_layers, principal, registry
from ..layers.spec import AdapterSpec
from ..state import WrapState, activate, add, refuse_busy, remove, wrap_state
from ..wrapping import check_name, saved_tensors, under, unwrap, wrap_spec
from . import lycoris, peft, schema
from ._safetensors import TensorFile, file_tensors, write_file
from .schema import AdapterFileError

METADATA_KEY = "peftlite"
FORMATS = ("peftlite", "peft", "lycoris")


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
         include=None, format: str = "peftlite", name: str | None = None, prefix: str | None = None) -> str:
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
            loads; layers PEFT cannot compute exactly are refused (``PeftFormatError``). Or ``"lycoris"``:
            one LyCORIS / kohya-style file (``formats/lycoris.py``) that ``lycoris.create_lycoris_from_weights``
            and diffusion UIs load; what it cannot hold is refused (``LycorisFormatError``).
        name: the adapter to save; may be left out when the model has one. Heads and trainable tensors,
            shared by all adapters, go into every file.
        prefix: with ``format="lycoris"``, what the keys start with: ``"lycoris"`` (the default, as
            ``create_lycoris`` names them), ``"lora_unet"`` / ``"lora_te"`` as kohya-style trainers do.
    Returns:
        the path written.
    Raises:
        ValueError: several adapters and no ``name``; nothing to save; bad arguments.
        KeyError: an unknown ``name``.
    """
    if format not in FORMATS:
        raise ValueError(f"save: format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if prefix is not None and format != "lycoris":
        raise ValueError(f"save: prefix= names a LyCORIS file's keys; pass format='lycoris' with it (got {format!r})")
    state = wrap_state(model)
    if state is None:
        raise ValueError("save: the model is not wrapped; call peftlite.wrap(model, ...) first")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"save: dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    adapter = _which(state, name, "save")
    tensors = saved_tensors(model, state, [adapter] if adapter else [])
    if any(t.is_meta for t in tensors.values()):
        raise ValueError("save: the adapter's tensors are on the meta device and hold no values; call "
                         "model.to_empty(device=...) and train or load the adapter first")
    if include is not None:
        keep = set(selection.select_tensors(model, include, "save include", names=list(tensors)))
        tensors = {k: t for k, t in tensors.items() if k in keep}
    if not tensors:
        raise ValueError("save: nothing to save (no adapters, heads or trainable modules)")
    config = model_config(model, state, adapter, include is not None)
    if adapter is not None:  # a principal init's adapter: the plain LoRA of rank 2r on the original weights
        tensors, config = principal.shared_tensors(adapted_layers(model), adapter, tensors, config)
    if format == "peft":
        peft_tensors, adapter_config = peft.to_peft(tensors, config)
        peft.check_direct_reads(model, list(config["layers"]))
        return peft.write(path, peft_tensors, adapter_config, dtype)
    if format == "lycoris":
        prefix = lycoris.DEFAULT_PREFIX if prefix is None else prefix
        lyco = lycoris.to_lycoris(tensors, config, prefix)
        lycoris.check_model(model, list(config["layers"]), prefix)
        return lycoris.write(path, lyco, dtype)
    return write(path, tensors, config, dtype)


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict[str, Any],
          dtype: torch.dtype | None = None) -> str:
    """Write tensors and a peftlite config as one safetensors file, atomically.

    Sharded tensors (FSDP2's DTensors) are gathered whole (``file_tensors``, a collective): call it on
    every rank. Every rank then writes the same tensors; the writes are atomic, so ranks may share a path.
    """
    meta = {"format": "pt", METADATA_KEY: json.dumps(config, separators=(",", ":"))}
    return write_file(path, file_tensors(tensors, dtype), meta, "save")


def _refuse_meta(model: nn.Module, what: str, then: str) -> None:
    """A model on the meta device holds no values: nowhere to load values to (they would be dropped)."""
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError(f"{what}: the model has tensors on the meta device, which hold no values; call "
                         f"model.to_empty(device=...) and {then} first")


def _config(path: str, meta: Mapping[str, str]) -> dict[str, Any]:
    """The validated peftlite config in a safetensors file's metadata."""
    if METADATA_KEY not in meta:
        raise AdapterFileError(f"{path}: a safetensors file without peftlite metadata; it is not a peftlite "
                               "adapter file")
    try:
        config = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError) as e:  # not JSON, or nested deeper than Python's recursion limit
        raise AdapterFileError(f"{path}: corrupt peftlite metadata ({type(e).__name__}: {e})") from None
    return schema.validate(config, path)


def open_file(path: str | os.PathLike) -> tuple[TensorFile, dict[str, Any]]:
    """A peftlite adapter file opened to be read tensor by tensor, and its config; only the header is read.

    The config is validated, and checked against the tensors' shapes (a layer's rank against its A and B).

    Raises:
        FileNotFoundError: no such file.
        AdapterFileError: truncated, corrupt, not safetensors, or not a peftlite adapter (names the reason).
    """
    f = TensorFile(path)
    try:
        config = _config(f.path, f.metadata)
        schema.check_shapes(config, {k: tuple(t.shape) for k, t in f.specs.items()}, f.path)
    except BaseException:
        f.close()
        raise
    return f, config


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of a peftlite adapter file (every tensor read; ``load`` reads one at a time).

    Raises:
        FileNotFoundError: no such file.
        AdapterFileError: truncated, corrupt, not safetensors, or not a peftlite adapter (names the reason).
    """
    f, config = open_file(path)
    with f:
        return {k: f[k] for k in f}, config


def read_adapter(path: str | os.PathLike, model: nn.Module | None = None, name: str | None = None):
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


def _check_fresh(model: nn.Module, path, config: dict, heads: Mapping[str, nn.Module] | None,
                 found: Mapping[str, torch.Tensor], adapter: str) -> dict[str, nn.Module]:
    """For an unwrapped model: check the file's layers, heads and trainable names; return the heads to put in.

    Everything is checked against the file's shapes before a head or an adapter is allocated, so a
    corrupt entry (a huge rank, a huge head) fails here instead of allocating what the file does not hold.
    """
    heads = dict(heads or {})
    unknown = [n for n in heads if n not in config["heads"]]
    if unknown:
        raise ValueError(f"heads={unknown} are not heads in {path} (it has {list(config['heads'])})")
    modules = dict(model.named_modules())
    built = {}
    for name, entry in config["heads"].items():
        if name not in modules:
            raise ValueError(f"{path}: the file has a head {name!r}, but the model has no module of that name to "
                             "replace")
        if name in heads:
            built[name] = heads[name]
            continue
        with torch.device("meta"):
            shell = schema.build_head(entry)
        if shell is None:
            raise ValueError(f"{path}: head {name!r} is a {entry['type']}, which load cannot re-create; pass it "
                             f"again: load(model, path, heads={{{name!r}: module}})")
        _check_head(model, path, name, shell, found)
        built[name] = schema.build_head(entry)
    for name, entry in config["layers"].items():
        if under(name, list(built)):
            raise ValueError(f"{path}: the file adapts {name!r}, which lies under a head it replaces")
        schema.check_layer(name, modules.get(name), entry, path)
    params = dict(model.named_parameters())
    for name in config["trainable"]:
        if name not in modules and name not in params:
            raise ValueError(f"{path}: the file trains {name!r}, which the model does not have")
    _check_adapter_shapes(path, modules, config, found, adapter)
    return built


def _check_head(model: nn.Module, path, name: str, shell: nn.Module, found: Mapping[str, torch.Tensor]) -> None:
    """A head as its entry would build it (``shell``, on meta) must fit the file's tensors; one the file holds
    no values for may not be larger than the whole model (a corrupt entry, not a head)."""
    expected = {f"{name}.{k}": t for k, t in shell.state_dict().items()}
    _compare(path, expected, {k: found[k] for k in expected if k in found}, strict=False, partial=True)
    unbacked = sum(t.numel() for k, t in expected.items() if k not in found)
    if unbacked > sum(p.numel() for p in model.parameters()):
        raise AdapterFileError(f"{path}: head {name!r} would hold {unbacked} values that the file does not have, "
                               "more than the whole model; its entry is corrupt")


def _check_adapter_shapes(path, modules: dict[str, nn.Module], config: dict, found: Mapping[str, torch.Tensor],
                          adapter: str) -> None:
    """Before adapters are attached: the file's A and B must have the shapes attaching them will allocate,
    and a layer the file holds no values for may not have a rank above the layer's full rank."""
    for name, entry in config["layers"].items():
        module = modules[name]
        try:
            want = schema.adapter_keys(name, module, AdapterSpec.from_entry(entry, f"{path}: layer {name!r}"),
                                       adapter)
        except ValueError as e:
            raise AdapterFileError(f"{path}: layer {name!r}: {e}") from None
        for key, shape in want.items():
            if key in found and tuple(found[key].shape) != tuple(shape):
                raise ValueError(f"{path}: {key} has shape {tuple(found[key].shape)} in the file, but the model "
                                 f"expects {tuple(shape)} (rank {entry['rank']} on its {name})")
        full = min(min(a[1], b[0]) for a, b in registry.adapter_shapes(module, 1).values())
        if entry["rank"] > full and not all(k in found for k in want):
            raise AdapterFileError(f"{path}: layer {name!r} has rank {entry['rank']}, above the layer's full rank "
                                   f"{full}, and the file holds no values for it; its entry is corrupt")


def non_finite(t: torch.Tensor) -> int:
    """How many NaN or Inf values ``t`` holds.

    A float64 sum is finite exactly when every value is (no sum of float32 or narrower values overflows
    it): one pass, no temporary tensor. Only when it is not are the values counted, in chunks.
    """
    if not t.is_floating_point():
        return 0
    wide = t.element_size() > 1  # float8 has no sum: counted as float32
    if wide and math.isfinite(float(t.sum(dtype=torch.float64))):
        return 0
    chunks = t.reshape(-1).split(1 << 22)
    return sum(c.numel() - int(torch.isfinite(c if wide else c.float()).sum()) for c in chunks)


class _Values(Mapping):
    """The file's tensors under the model's keys, read when asked (``_copy_in`` reads one at a time); an
    adapter tensor that holds NaN or Inf is refused as it is read."""

    def __init__(self, source: Mapping[str, torch.Tensor], keys: dict[str, str], layers: dict, path):
        self._source, self._keys, self._path = source, keys, path
        self._adapter = {k for k in keys if schema.adapter_layer(k, layers) is not None}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._source[self._keys[key]]
        if key in self._adapter:
            bad = non_finite(t)
            if bad:
                raise AdapterFileError(f"{self._path}: {key} holds {bad} non-finite value(s) (NaN or Inf) of "
                                       f"{t.numel()}; load refuses them (a diverged training?), and "
                                       "peftlite.formats.native.read still reads the file to inspect it")
        return t

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _wrap_as_file(model: nn.Module, config: dict, built: dict[str, nn.Module]) -> None:
    """Wrap an unwrapped model as the file says: its layers, each with its entry's spec, in one wrap."""
    specs = {name: AdapterSpec.from_entry(entry, f"layer {name!r}") for name, entry in config["layers"].items()}
    trainable = list(config["trainable"]) or None
    targets = (lambda n, m: n in specs) if specs else None
    wrap_spec(model, targets, next(iter(specs.values()), AdapterSpec()), heads=built or None, trainable=trainable,
              train_bn=config["train_bn"], name=schema.adapter_name(config), layer_specs=specs)


def _copy_in(model: nn.Module, tensors: Mapping[str, torch.Tensor], layers: dict, adapter: str) -> None:
    """Copy file values into the model's tensors; a sharded one (FSDP2's DTensor) takes its own slice.

    Every rank reads the whole file, so a DTensor's shard is cut locally (``distribute_tensor`` with
    ``src_data_rank=None``): no communication, and ranks may load at different times.
    """
    current = model.state_dict(keep_vars=True)
    dtensor = getattr(torch.distributed, "tensor", None)  # there once imported: a DTensor exists only then
    with torch.no_grad():
        for key, value in tensors.items():
            if key in current:
                target = current[key]
                if dtensor is not None and isinstance(target, dtensor.DTensor) and type(value) is torch.Tensor:
                    value = dtensor.distribute_tensor(value.to(target.dtype), target.device_mesh,
                                                      target.placements, src_data_rank=None)
                target.copy_(value)
    modules = dict(model.named_modules())
    for name, entry in layers.items():  # the file's alpha is the scale its values were trained at
        module = modules.get(name)
        if isinstance(module, AdaptedLayer) and adapter in module.lora:
            spec = AdapterSpec.from_entry(entry, f"layer {name!r}")
            for pair in module.pairs(adapter).values():
                pair.alpha, pair.rank_scaling = spec.alpha, spec.rank_scaling


def load(model: nn.Module, path: str | os.PathLike, heads: Mapping[str, nn.Module] | None = None,
         strict: bool = True, name: str | None = None, format: str | None = None,
         prefix: str | None = None) -> nn.Module:
    """Load an adapter file into ``model`` and return the model.

    ``path`` may also be a Hugging Face PEFT LoRA adapter directory (see ``peft``; a directory that holds
    several adapters in subfolders, as PEFT writes them, loads ``name``'s); its ``modules_to_save``
    become peftlite ``trainable`` modules. Or a LyCORIS / kohya-style ``.safetensors`` file (LoRA / LoCon,
    LoHa, LoKr; ``formats/lycoris.py``), told apart from a peftlite file by its keys (it has no peftlite
    metadata), or named with ``format="lycoris"``. Such a file names modules by their paths with the dots
    as underscores after a prefix; a whole-pipeline file holds entries of several models (``lora_unet_``,
    ``lora_te_``): pass ``prefix="lora_unet"`` to load this model's, and leave the others out (without
    it, a file of several prefixes is refused, naming them).

    - Into an unwrapped base model, it wraps the model as the file says (re-creating Linear/Conv2d heads;
      other head types are passed again with ``heads=``).
    - Into a wrapped model that has an adapter of that name, it loads the values into it.
    - Into a wrapped model without one, it adds the adapter, inactive (``peftlite.use`` switches), and
      leaves the others untouched, merged or not. The file's heads and trainable tensors, shared by all
      adapters, are loaded too (a warning says when their values change).

    The adapter takes ``name`` (default: the name it was saved under). Tensors are cast to the device and
    dtype of the tensors they replace. All or nothing: on any error the model is left exactly as it was.

    ``format``: ``"peftlite"``, ``"peft"`` or ``"lycoris"``; None (the default) tells them apart.

    Memory: a peftlite file is streamed. Its header (every key, shape and dtype) is checked against the
    model first, then its tensors are read one at a time as they are copied in; so beyond the adapter
    tensors it creates, a load holds one of the file's tensors, plus a copy of the tensors it overwrites
    in place (kept to undo a load that fails midway). A PEFT directory or a LyCORIS file is read whole,
    then translated.

    Non-finite values: an adapter tensor (A, B, a DoRA magnitude) holding NaN or Inf is refused with an
    AdapterFileError naming the tensor and the count, and the model is left as it was; there is no
    option to load one (``peftlite.formats.native.read`` still reads such a file, to inspect it). Heads
    and trainable tensors are loaded as saved: a buffer may hold -inf by design (an attention mask).

    Raises:
        FileNotFoundError: no such path (an OSError, as ``open`` raises; the model is unchanged).
        AdapterFileError: the file cannot be read, or is corrupt: truncated, a malformed header or
            config, a config that contradicts the tensors, non-finite adapter values (a ValueError; it
            names the file and what is wrong; the model is unchanged).
        PeftFormatError: a PEFT directory that peftlite cannot translate exactly (a ValueError).
        LycorisFormatError: a LyCORIS file that peftlite cannot translate exactly, or whose names do not
            map to the model's modules one to one (a ValueError; it names the key).
        ValueError: keys, shapes or dtypes do not fit the model (names the key, expected and found shapes).
    """
    if name is not None:
        check_name(name, "load")
    _refuse_meta(model, "load", "load the base weights into it")
    source, config = _open(path, model, name, format, prefix)
    try:
        found = source.specs if isinstance(source, TensorFile) else {k: t.to("meta") for k, t in source.items()}
        adapter = name or schema.adapter_name(config)
        keys, config = schema.renamed({k: k for k in found}, config, adapter)  # the model's key -> the file's
        found = {k: found[f] for k, f in keys.items()}  # shapes and dtypes only: nothing read yet
        values = _Values(source, keys, config["layers"], path)
        partial = bool(config.get("partial", False))
        state = wrap_state(model)
        if state is None:
            built = _check_fresh(model, path, config, heads, found, adapter)
            replaced = {n: model.get_submodule(n) for n in built}
            kept = {k: t.detach().clone() for k, t in model.state_dict().items()  # trainable: written in place
                    if k in found and not under(k, list(built))}
            try:
                _wrap_as_file(model, config, built)
                _compare(path, saved_tensors(model, wrap_state(model), [adapter]), found, strict, partial)
                _copy_in(model, values, config["layers"], adapter)
            except BaseException:
                _undo_wrap(model, replaced)
                _copy_in(model, kept, {}, adapter)
                raise
            return model
        if heads:
            raise ValueError("heads= is only for loading into an unwrapped model; this model is already wrapped")
        if adapter in state.adapters and config["layers"]:
            principal.refuse_owner(adapted_layers(model), [adapter], f"load {path}",
                                   "a file holds a LoRA on the original weights. Load it under another name= (the "
                                   "model computes on the original weights for it), or peftlite.restore_base(model) "
                                   "first")
        if adapter in state.adapters or not config["layers"]:  # an adapter the model has, or heads only
            return _load_values(model, path, found, values, config, adapter, strict, partial)
        return _load_new(model, path, found, values, config, adapter, strict, partial)
    finally:
        if isinstance(source, TensorFile):
            source.close()


def _open(path, model: nn.Module, name: str | None, format: str | None, prefix: str | None):
    """``(source, config)`` of a peftlite file (a TensorFile, read later), or of a PEFT directory or LyCORIS file
    (tensors, translated); ``format`` None tells them apart (a folder; a file's metadata and keys)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"load: format must be one of {', '.join(map(repr, FORMATS))} or None, got {format!r}")
    if format is None and os.path.isfile(path):
        with TensorFile(path) as f:
            format = "lycoris" if METADATA_KEY not in f.metadata and lycoris.looks_like(f.specs) else "peftlite"
    if prefix is not None and format != "lycoris":
        raise ValueError(f"load: prefix= selects a LyCORIS file's entries, but {path} is not one (format {format!r})")
    if format == "lycoris":
        return lycoris.read(path, model, prefix)
    if os.path.isdir(path) and format in (None, "peft"):
        return peft.read(path, model, name)
    return open_file(path)


def _check_layers(model: nn.Module, path, config: dict, adapter: str, strict: bool, new: bool) -> None:
    modules = dict(model.named_modules())
    state = wrap_state(model)
    for name, entry in config["heads"].items():  # a head's values fit its shapes; its entry must fit too
        if name in state.heads and name in modules:
            mine = schema.head_entry(modules[name])
            diff = ", ".join(f"{k}: file {entry[k]!r}, model {v!r}" for k, v in mine.items() if entry.get(k, v) != v)
            if diff:
                raise ValueError(f"{path}: the file's head {name!r} differs from the model's ({diff})")
    for name, entry in config["layers"].items():
        module = modules.get(name)
        if new:
            if under(name, state.heads):
                raise ValueError(f"{path}: the file adapts {name!r}, which lies under the head {name!r} replaces")
            schema.check_layer(name, module, entry, path)
            registry.check_adaptable(name, module, adapter)
        elif not isinstance(module, AdaptedLayer) or adapter not in module.lora:
            if strict:
                raise ValueError(f"{path}: the file adapts {name!r}, which has no adapter {adapter!r} in this model")
        else:
            schema.check_layer(name, module, entry, path)


def _load_values(model, path, found, values, config, adapter, strict, partial) -> nn.Module:
    """Load the file's values into the model's adapter ``adapter`` (and its heads), all or nothing."""
    refuse_busy(model, "load", routed=False, adapter=adapter)
    current = saved_tensors(model, wrap_state(model), [adapter])
    _compare(path, current, found, strict, partial)
    _check_layers(model, path, config, adapter, strict, new=False)
    backup = {k: current[k].detach().clone() for k in found if k in current}
    pairs = [p for _, m in adapted_layers(model) if adapter in m.lora for p in m.pairs(adapter).values()]
    alphas = [(p.alpha, p.rank_scaling) for p in pairs]
    try:
        _copy_in(model, values, config["layers"], adapter)
    except BaseException:
        _copy_in(model, backup, {}, adapter)
        for p, (alpha, rank_scaling) in zip(pairs, alphas, strict=True):
            p.alpha, p.rank_scaling = alpha, rank_scaling
        raise
    return model


def _load_new(model, path, found, values, config, adapter, strict, partial) -> nn.Module:
    """Add the file's adapter to a wrapped model as a new, inactive adapter ``adapter``, all or nothing."""
    state = wrap_state(model)
    _check_layers(model, path, config, adapter, strict, new=True)
    modules = dict(model.named_modules())
    _check_adapter_shapes(path, modules, config, found, adapter)
    shared = {k: t.detach().clone() for k, t in saved_tensors(model, state, [adapter]).items()}  # heads: no adapter yet
    try:
        for lname, entry in config["layers"].items():
            module = modules[lname]
            registry.attach(module, registry.kind_of(module), AdapterSpec.from_entry(entry, f"layer {lname!r}"),
                            adapter=adapter)
        add(state, adapter)
        activate(model, state)
        _compare(path, saved_tensors(model, state, [adapter]), found, strict, partial)
        changed = [k for k, t in shared.items() if k in values and not torch.equal(t, values[k].to(t))]
        _copy_in(model, values, config["layers"], adapter)
    except BaseException:
        _copy_in(model, shared, {}, adapter)
        remove(model, state, adapter)
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
