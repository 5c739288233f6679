"""LyCORIS and kohya-style single-file adapters (LoRA / LoCon, LoHa, LoKr), read and written without LyCORIS.

A file holds ``<module>.<suffix>`` tensors, ``<module>`` the model's module path with a prefix
(``_lycoris_names``: ``lycoris_down_blocks_0_resnets_0_conv1``, ``lora_unet_...``, ``lora_te_...``), and a 0-d
``<module>.alpha``. Each algorithm's factors become peftlite's flat ones (A (r, fan_in), B (out, r); for a
Conv2d fan_in = in/groups·kh·kw, in the weight's (in, kh, kw) order):

    LoRA / LoCon  lora_down.weight (r, in[/g, kh, kw])   -> "lora"  A = down
                  lora_up.weight (out, r[, 1, 1])                    B = up
                  Tucker: + lora_mid.weight (r, r, kh, kw), down (r, in/g, 1, 1): A = mid ×₂ down
    LoHa          hada_w1_b (r, fan_in), hada_w1_a (out, r) -> "loha"  A1, B1 (and w2_b, w2_a: A2, B2)
                  Tucker: + hada_t1 (r, r, kh, kw), hada_w1_b (r, in/g), hada_w1_a (r, out):
                          A1 = t1 ×₂ w1_b, B1 = w1_aᵀ (and t2 for the second pair)
    LoKr          lokr_w1 (out_l, in_m) or lokr_w1_a (out_l, r) @ lokr_w1_b (r, in_m)   -> "lokr"  W1 or B1, A1
                  lokr_w2 (out_k, in_n[, kh, kw]) or lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n[·kh·kw])
                                                                                     W2 or B2, A2 (flat)
                  Tucker: + lokr_t2 (r, r, kh, kw), lokr_w2_a (r, out_k), lokr_w2_b (r, in_n):
                          A2 = t2 ×₂ w2_b, B2 = w2_aᵀ

Here ``core ×₂ factor`` contracts the core's second mode: A[a, (c, h, w)] = Σ_b core[a, b, h, w]·factor[b, c]
(``tucker_in``), so a Tucker file reads as the flat form of the same ΔW, exact up to fp32 rounding.

Scale, as LyCORIS's forward (and kohya's loaders) apply it: ``alpha / r``, r the factors' rank (lora_down's,
hada_w1_b's, lokr_w1_a's or lokr_w2_a's columns); ``alpha`` missing or 0 means alpha = r (scale 1); a
LoKr with both factors full has scale 1 (LyCORIS stores alpha = its dim there and ignores it). LyCORIS
4.1.3's ``merge_to`` applies the scale twice for LoHa and low-rank LoKr; peftlite follows the forward.

Written files use the same keys and shapes (conv LoRA as lora_down (r, in/g, kh, kw), lora_up (out, r, 1, 1);
LoHa and LoKr flat, never Tucker), alpha as a 0-d float32 tensor equal to scale·r (so rsLoRA is written
as the alpha that gives its scale), and a full/full LoKr's scale folded into lokr_w1. What a file cannot
hold is refused by name: DoRA, heads and trained modules, BatchNorm statistics, nn.MultiheadAttention,
Linear/Conv2d subclasses, convs with a padding_mode other than zeros (LyCORIS's delta pads with zeros).
Input dropout is a training setting a file does not record: it is not written, and is 0 when read.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import DEFAULT_ADAPTER, AdaptedLayer, registry
from ..layers.spec import AdapterSpec
from . import _direct_reads, schema
from ._lycoris_factors import READERS, REFUSED, SUFFIXES, WRITERS, Entry, tucker_in
from ._lycoris_names import DEFAULT_PREFIX, LycorisFormatError, check_prefix, module_index, prefix_of, resolve, select
from ._lycoris_names import underscored as _underscored
from ._safetensors import file_tensors, read_file, write_file

__all__ = ["DEFAULT_PREFIX", "LycorisFormatError", "check_model", "from_lycoris", "looks_like", "read", "to_lycoris",
           "tucker_in", "write"]

_DISTINCT = {s for ss in SUFFIXES.values() for s in ss} | (set(REFUSED) - {"weight"})


def looks_like(keys) -> bool:
    """Do these safetensors keys look like a LyCORIS / kohya file (``<prefix>_<module>.<suffix>``)?"""
    for key in keys:
        lora_name, dot, suffix = key.partition(".")
        if dot and (suffix in _DISTINCT or (suffix in ("alpha", "weight") and prefix_of(lora_name))):
            return True
    return False


# ---- reading --------------------------------------------------------------------------------------

def _algorithm(where: str, lora_name: str, parts: dict[str, Tensor]) -> str:
    """Which algorithm an entry's suffixes are; unknown, refused or mixed ones raise, named."""
    for suffix in parts:
        if suffix in REFUSED:
            raise LycorisFormatError(f"{where}: {lora_name}.{suffix} belongs to {REFUSED[suffix]}, which peftlite does "
                                     "not read; it reads LoRA / LoCon, LoHa and LoKr entries")
        if suffix != "alpha" and not any(suffix in ss for ss in SUFFIXES.values()):
            raise LycorisFormatError(f"{where}: {lora_name}.{suffix} is not a key of any LyCORIS algorithm peftlite "
                                     f"knows ({', '.join(s for ss in SUFFIXES.values() for s in ss)}, alpha)")
    algos = [a for a, ss in SUFFIXES.items() if any(s in parts for s in ss)]
    if len(algos) != 1:
        raise LycorisFormatError(f"{where}: {lora_name} has {', '.join(sorted(parts))}: "
                                 + ("no weights" if not algos else f"keys of {' and '.join(algos)} at once"))
    return algos[0]


def _entry(module: nn.Module, spec: AdapterSpec) -> dict[str, Any]:
    """The peftlite layer entry of ``module`` adapted as ``spec`` says."""
    base = type(module).base_class if isinstance(module, AdaptedLayer) else type(module)
    return {"kind": registry.kind_of(module).name, **spec.entry(), "slots": ["weight"], "base_class": base.__name__,
            **schema.layer_geometry(module)}


def from_lycoris(tensors: dict[str, Tensor], model: nn.Module, prefix: str | None = None,
                 where: str = "<lycoris>") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Translate a LyCORIS / kohya file's tensors to peftlite's ``(tensors, config)`` for ``model``.

    Args:
        tensors: the file's tensors by key (``<prefix>_<module>.<suffix>``).
        model: the model the file is for: its module names read the keys, its layers give the shapes.
        prefix: the prefix of this model's entries (``"lora_unet"``); the file's others are left out.
            None: the file must hold one known prefix.
        where: the file, for messages.
    Raises:
        LycorisFormatError: a refused algorithm or DoRA, a key of no known algorithm, a name that maps to no
            module or to two, SDXL's SGM names, several prefixes without ``prefix=``, shapes that do not fit
            the model's layer or each other, a bad alpha (each names the key).
    """
    entries: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        lora_name, dot, suffix = key.partition(".")
        if not dot:
            raise LycorisFormatError(f"{where}: {key!r} is not a LyCORIS key (<module>.<suffix>, such as "
                                     "lycoris_conv_in.lora_down.weight)")
        entries.setdefault(lora_name, {})[suffix] = t
    if prefix is not None:
        check_prefix(prefix, "load")
    prefix, names = select(list(entries), prefix, where)
    index = module_index(model)
    layers: dict[str, dict[str, Any]] = {}
    out: dict[str, Tensor] = {}
    for lora_name in names:
        parts = entries[lora_name]
        algo = _algorithm(where, lora_name, parts)
        path = resolve(lora_name, prefix, model, index, where)
        module = model.get_submodule(path)
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise LycorisFormatError(f"{where}: {lora_name}: the model's {path} has padding_mode="
                                     f"{module.padding_mode!r}; LyCORIS computes its delta with zero padding, so "
                                     "peftlite cannot match it")
        spec, factors = READERS[algo](Entry(where, lora_name, path, module, parts))
        layers[path] = _entry(module, spec)
        out.update({f"{path}.lora.{DEFAULT_ADAPTER}.{k}": t for k, t in factors.items()})
    if not layers:
        raise LycorisFormatError(f"{where}: holds no LyCORIS entries")
    config = schema.file_config(layers, {}, [], False, False, source={"format": "lycoris", "prefix": prefix})
    return out, schema.validate(config, where)


def read(path: str | os.PathLike, model: nn.Module, prefix: str | None = None
         ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A LyCORIS / kohya ``.safetensors`` file read whole and translated for ``model`` (``from_lycoris``)."""
    tensors, _ = read_file(path)
    return from_lycoris(tensors, model, prefix, os.fspath(path))


# ---- writing --------------------------------------------------------------------------------------

def check_model(model: nn.Module, names: list[str], prefix: str = DEFAULT_PREFIX, where: str = "save") -> None:
    """Refuse layers a LyCORIS file would not name or compute as peftlite does: one whose underscored name
    another Linear or Conv2d shares (a reader could not tell them apart), and one whose weight an enclosing
    forward computes with (LyCORIS acts only when the layer is called)."""
    index = module_index(model)
    for name in names:
        twins = [n for n in index.get(_underscored(name), [])
                 if n != name and isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d))]
        if twins:
            raise LycorisFormatError(f"{where}: {name} and {', '.join(twins)} share the LyCORIS name "
                                     f"{prefix}_{_underscored(name)}, so a reader could not tell them apart")
        reader = _direct_reads.reader_of(model, name)
        if reader is not None:
            raise LycorisFormatError(f"{where}: {reader[0]}.forward reads {reader[1]}.weight directly and computes "
                                     f"with it, so LyCORIS would bypass the adapter on {name}; save this model in "
                                     "peftlite format")


def _check_layer(where: str, name: str, e: dict[str, Any]) -> None:
    """Refuse a layer entry that a LyCORIS file cannot hold, or that LyCORIS would compute differently."""
    if e.get("kind") not in ("linear", "conv2d") or e.get("slots", ["weight"]) != ["weight"]:
        raise LycorisFormatError(f"{where}: {name} is an adapted {e.get('kind')} (slots {e.get('slots')}); a "
                                 "LyCORIS file adapts the weight of nn.Linear and nn.Conv2d layers only")
    if e.get("base_class") not in ("Linear", "Conv2d"):
        raise LycorisFormatError(f"{where}: {name} is a {e.get('base_class')} (a Linear/Conv2d subclass); LyCORIS "
                                 "would compute it with its own forward, not as peftlite does, so it is refused")
    if e.get("variant", "lora") != "lora":
        raise LycorisFormatError(f"{where}: {name} is a {e['variant']} layer; LyCORIS's weight decomposition "
                                 "(dora_scale) is not written by peftlite, so save it in peftlite format")
    if e["kind"] == "conv2d" and e.get("padding_mode") not in (None, "zeros"):
        raise LycorisFormatError(f"{where}: {name} has padding_mode={e['padding_mode']!r}; LyCORIS computes its "
                                 "delta with zero padding, so it would compute this layer differently")


def to_lycoris(tensors: dict[str, Tensor], config: dict[str, Any], prefix: str = DEFAULT_PREFIX,
               where: str = "save") -> dict[str, Tensor]:
    """Translate peftlite's ``(tensors, config)`` to a LyCORIS file's tensors, keys ``<prefix>_<module>.<suffix>``.

    Raises:
        LycorisFormatError: what a LyCORIS file cannot hold or LyCORIS would compute differently (named).
        ValueError: a bad ``prefix``.
    """
    check_prefix(prefix, where)
    for field, what in (("heads", "heads"), ("trainable", "fully trained modules")):
        if config.get(field):
            raise LycorisFormatError(f"{where}: the adapter has {what} ({', '.join(config[field])}), which a LyCORIS "
                                     "file does not hold; save it in peftlite format")
    schema.check_exportable(config, where, LycorisFormatError, "a LyCORIS file")
    adapter = schema.adapter_name(config)
    out: dict[str, Tensor] = {}
    seen: dict[str, str] = {}
    for name, e in config["layers"].items():
        _check_layer(where, name, e)
        lora_name = f"{prefix}_{_underscored(name)}"
        if lora_name in seen:
            raise LycorisFormatError(f"{where}: {seen[lora_name]} and {name} share the LyCORIS name {lora_name}")
        seen[lora_name] = name
        spec = AdapterSpec.from_entry(e, f"layer {name!r}")
        head = f"{name}.lora.{adapter}."
        mine = {k[len(head):]: t for k, t in tensors.items() if k.startswith(head)}
        out.update({f"{lora_name}.{suffix}": t for suffix, t in WRITERS[spec.kind](e, mine, spec).items()})
    if not out:
        raise LycorisFormatError(f"{where}: the adapter has no layers to write")
    return out


def write(path: str | os.PathLike, tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> str:
    """Write a LyCORIS file atomically; factors in ``dtype`` if given, alphas always float32."""
    out = file_tensors({k: t for k, t in tensors.items() if not k.endswith(".alpha")}, dtype)
    out.update(file_tensors({k: t for k, t in tensors.items() if k.endswith(".alpha")}))
    return write_file(path, out, {"format": "pt"}, "save")
