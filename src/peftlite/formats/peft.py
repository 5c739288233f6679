"""Hugging Face PEFT LoRA, LoHa and LoKr adapter directories, read and written without PEFT and without pickle.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (the prefix is absent for adapters made
with ``inject_adapter_in_model``) and ``base_model.model.<module>.<param>`` for ``modules_to_save``.

Both directions go through peftlite's in-memory file form, ``(tensors, config)`` (``schema``), so
``load``/``save`` and the CLI's ``convert`` share one translation:

    Linear(in, out):  PEFT A (r, in)          <-> peftlite A (r, in)
                      PEFT B (out, r)         <-> peftlite B (out, r)
    Conv2d, groups=1: PEFT A (r, in, kh, kw)  <-> peftlite A (r, in*kh*kw)
                      PEFT B (out, r, 1, 1)   <-> peftlite B (out, r)
    scale:            lora_alpha / r                      <-> alpha / rank
                      lora_alpha / sqrt(r), use_rslora     <-> rank_scaling "sqrt"
    DoRA (use_dora):  PEFT lora_magnitude_vector (out,) for a Linear, (1, out, 1, 1) for a Conv2d
                                                            <-> peftlite magnitude (out,), variant "dora"
    modules_to_save   <-> peftlite ``trainable`` modules (peftlite heads are written as modules_to_save)
    LoHa (peft_type "LOHA"): hada_w1_b / hada_w1_a / hada_w2_b / hada_w2_a <-> A1 / B1 / A2 / B2, scale
                      alpha / r; conv factors are stored flat, so reading one needs the model; the Tucker form
                      (use_effective_conv2d) is read as the flat form of the same ΔW (the core contracted into
                      hada_w_b); rank_dropout and module_dropout are refused, and so are LoHa
                      layers with rsLoRA or input dropout on writing, and LoRA and LoHa layers in one adapter
    LoKr (peft_type "LOKR"): lokr_w1 / lokr_w1_a / lokr_w1_b <-> W1 / B1 / A1, lokr_w2 / lokr_w2_a / lokr_w2_b
                      <-> W2 / B2 / A2 (a conv's lokr_w2 is (out_k, in_n, kh, kw), W2 is flat); scale alpha / r.
                      The split is read from the tensors' shapes; PEFT makes it again on loading from
                      decompose_factor and decompose_both, so writing needs one pair of them that gives
                      every layer's split. lokr_t2 (Tucker) is read as LoHa's is; the same refusals

What PEFT cannot express, or computes differently from the base layer, is refused with an error naming
the feature: grouped-conv adapters, dilated or non-zero padding_mode convs (PEFT's LoRA conv drops both),
MultiheadAttention and subclass layers, BatchNorm statistics (``train_bn=True``), DoRA and LoRA layers in one
adapter (PEFT's ``use_dora`` is one flag); and on reading, non-LoRA methods, ``fan_in_fan_out``,
``lora_bias``, trained biases and other LoRA variants.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..layers import DEFAULT_ADAPTER, lokr
from ..layers.registry import plain_type
from ..layers.spec import AdapterSpec, is_positive
from . import _direct_reads, schema
from ._safetensors import file_tensors, read_file, write_folder
from .schema import AdapterFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# LoHa (peft_type "LOHA"): hada_w1_a (out, r) = B1, hada_w1_b (r, fan_in) = A1, and the same for w2; t1/t2: Tucker
_HADA_KEY = re.compile(r"^(?P<module>.+)\.hada_(?P<part>w1_a|w1_b|w2_a|w2_b|t1|t2)$")
_HADA_NAMES = {"w1_b": "A1", "w1_a": "B1", "w2_b": "A2", "w2_a": "B2"}
# LoKr (peft_type "LOKR"): lokr_w1 (out_l, in_m) = W1 or lokr_w1_a (out_l, r) = B1 @ lokr_w1_b (r, in_m) = A1; the
# same for w2 (a conv's lokr_w2 is 4-D, W2 flat); t2: Tucker
_LOKR_KEY = re.compile(r"^(?P<module>.+)\.lokr_(?P<part>w1|w1_a|w1_b|w2|w2_a|w2_b|t2)$")
_LOKR_NAMES = {"w1": "W1", "w1_a": "B1", "w1_b": "A1", "w2": "W2", "w2_a": "B2", "w2_b": "A2"}
# per peft_type: (key pattern, key part -> peftlite parameter, the Tucker parts, the kind)
_FACTORED = {"LOHA": (_HADA_KEY, _HADA_NAMES, ("t1", "t2"), "loha"), "LOKR": (_LOKR_KEY, _LOKR_NAMES, ("t2",), "lokr")}

# Config fields that change what a LoRA layer computes, and that peftlite does not implement.
_UNSUPPORTED_FLAGS = {
    "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "transposed base weights (fan_in_fan_out, GPT-2 Conv1D)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}


class PeftFormatError(ValueError):
    """A PEFT directory or adapter that peftlite cannot translate exactly; the message names the feature."""


# ---- reading a PEFT directory -------------------------------------------------------------------

def read_raw(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` of a PEFT adapter directory, untranslated.

    Raises:
        AdapterFileError: a folder without the two files, a pickle instead of safetensors, unreadable
            JSON or safetensors (names the file and the reason).
    """
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        subs = sorted(d for d in os.listdir(path)  # not a save's temporary folder, left by a killed process
                      if os.path.isfile(os.path.join(path, d, CONFIG_NAME)) and not d.startswith(".peftlite-"))
        hint = f"; adapters found in subfolders: {', '.join(subs)}" if subs else ""
        raise AdapterFileError(f"{path}: a folder without {CONFIG_NAME}, so not a PEFT adapter directory{hint}")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise AdapterFileError(
                f"{path}: holds {PICKLE_NAME}, a pickle, which peftlite never loads (unpickling runs code). "
                f"Re-save it as {WEIGHTS_NAME} with PEFT: model.save_pretrained(dir, safe_serialization=True)")
        raise AdapterFileError(f"{path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON; too deeply nested
        raise AdapterFileError(f"{config_path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path}: not a JSON object")
    tensors, _ = read_file(weights_path)
    return tensors, config


def _check_config(path: str, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "LOHA", "LOKR"):
        raise PeftFormatError(f"{path}: peft_type {peft_type!r} is not supported; peftlite reads LoRA, LoHa and "
                              "LoKr adapters (peft_type 'LORA', 'LOHA', 'LOKR')")
    if peft_type in _FACTORED:
        for key in ("rank_dropout", "module_dropout"):
            if config.get(key) not in (None, 0, 0.0):
                raise PeftFormatError(f"{path}: uses {key} = {config[key]!r}, a {peft_type} training option "
                                      "peftlite does not implement; only adapters with 0 can be read")
    for key, feature in _UNSUPPORTED_FLAGS.items():
        if config.get(key) not in (None, False, {}, [], "megatron.core"):
            raise PeftFormatError(f"{path}: uses {feature} = {config[key]!r}, which peftlite does not support")
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{path}: bias={config['bias']!r} trains the base layers' biases, which peftlite's "
                              "LoRA does not support; only bias='none' adapters can be read")
    for key in ("r", "lora_alpha" if peft_type == "LORA" else "alpha"):
        if not is_positive(config.get(key)):
            raise PeftFormatError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise PeftFormatError(f"{path}: {key} must be a JSON object, got {config[key]!r}")
        for pattern, value in patterns.items():
            _regex(path, key, pattern)
            if not is_positive(value):
                raise PeftFormatError(f"{path}: {key}[{pattern!r}] must be a positive number, got {value!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _regex(path, "target_modules", targets)
    elif not (targets is None or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise PeftFormatError(f"{path}: target_modules must be a regex or a list of module names, got {targets!r}")
    save = config.get("modules_to_save")
    if not (save is None or isinstance(save, list) and all(isinstance(t, str) and t for t in save)):
        raise PeftFormatError(f"{path}: modules_to_save must be a list of module names, got {save!r}")
    dropout = config.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise PeftFormatError(f"{path}: lora_dropout must be a probability in [0, 1), got {dropout!r}")
    for key in ("use_dora", "use_rslora"):
        if not isinstance(config.get(key, False), bool):
            raise PeftFormatError(f"{path}: {key} must be true or false, got {config[key]!r}")


def _regex(path: str, key: str, pattern: object) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError, RecursionError) as e:
        raise PeftFormatError(f"{path}: {key} has {pattern!r}, which is not a regular expression ({e})") from None


def _pattern_value(patterns: dict[str, Any], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches a dotted suffix of ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _targeted(target_modules, name: str) -> bool:
    """PEFT's target_modules rule: a string is a full-match regex; a list matches names or dotted suffixes."""
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def _owner(key: str, modules_to_save: list[str]) -> str | None:
    """The outermost module path of ``key`` that PEFT would have wrapped for ``modules_to_save``."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix.endswith(m) for m in modules_to_save):
            return prefix
    return None


def _conv_geometry(module: nn.Module | None, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    if module is not None:
        return schema.layer_geometry(module)
    # Without a model, PEFT's files do not say stride, padding, dilation or padding_mode: left unknown
    # (null), and checked against the model's layer when the file is loaded.
    return {"in_channels": a.shape[1], "out_channels": b.shape[0], "kernel_size": list(a.shape[2:]),
            "stride": None, "padding": None, "dilation": None, "groups": 1, "padding_mode": None}


def _check_module(where: str, name: str, module: nn.Module, kind: str) -> None:
    """The model's layer must be what PEFT computed: a plain Linear, or a groups=1 undilated zeros conv."""
    want = {"linear": nn.Linear, "conv2d": nn.Conv2d}[kind]
    if plain_type(module) is not want:
        raise PeftFormatError(f"{where}: {name} holds a {want.__name__} adapter, but the model's {name} is a "
                              f"{type(module).__name__}; it is read into nn.{want.__name__} only")
    if kind == "conv2d" and module.groups != 1:
        raise PeftFormatError(f"{where}: {name} is a grouped conv (groups={module.groups}); PEFT's "
                              "grouped-conv LoRA is not a valid grouped update and has no exact peftlite form")
    if kind == "conv2d" and (tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros"):
        raise PeftFormatError(
            f"{where}: {name} has dilation={tuple(module.dilation)}, padding_mode={module.padding_mode!r}; "
            "PEFT's LoRA conv drops both, so its outputs for this layer cannot be matched exactly")


def _layer(where: str, name: str, a: torch.Tensor, b: torch.Tensor, config: dict[str, Any],
           module: nn.Module | None) -> dict[str, Any]:
    """peftlite's config entry for one PEFT lora_A/lora_B pair, after checking it."""
    shapes = f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}"
    if a.dim() not in (2, 4) or b.dim() != a.dim():
        raise PeftFormatError(f"{where}: {name} has {shapes}; only Linear and Conv2d adapters are supported "
                              "(not Conv1d, Conv3d or Embedding)")
    r = a.shape[0]
    if a.dim() == 4 and b.dim() == 4 and b.shape[1] != r and b.shape[1] and r % b.shape[1] == 0:
        raise PeftFormatError(f"{where}: {name} is a grouped-conv adapter ({shapes}); PEFT's grouped-conv "
                              "LoRA has no exact peftlite form")
    if a.dim() == 2 and b.dim() == 2:
        kind = "linear"
    elif a.dim() == 4 and b.dim() == 4 and tuple(b.shape[2:]) == (1, 1):
        kind = "conv2d"
    else:
        raise PeftFormatError(f"{where}: {name} has {shapes}; only Linear and Conv2d adapters are supported "
                              "(not Conv1d, Conv3d or Embedding)")
    if b.shape[1] != r:
        raise PeftFormatError(f"{where}: {name} has {shapes}, whose ranks disagree")
    expected_r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    if r != expected_r:
        raise PeftFormatError(f"{where}: {name} has rank {r} ({shapes}), but the config's r / rank_pattern "
                              f"gives it rank {expected_r}")
    if module is not None:
        _check_module(where, name, module, kind)
        want_a, want_b = schema.adapter_keys(name, module, AdapterSpec(rank=r)).values()
        if a[0].numel() != want_a[1] or b.shape[0] != want_b[0]:
            raise PeftFormatError(f"{where}: {name} has {shapes}, which do not fit the model's "
                                  f"{type(module).__name__} (A {want_a}, B {want_b} as peftlite stores them)")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
    if kind == "linear":
        geometry = {"in_features": a.shape[1], "out_features": b.shape[0]}
    else:
        geometry = _conv_geometry(module, a, b)
    variant = {k: v for k, v in (("variant", "dora" if config.get("use_dora") else "lora"),
                                 ("rank_scaling", "sqrt" if config.get("use_rslora") else "linear"))
               if v not in ("lora", "linear")}
    return {"kind": kind, "rank": r, "alpha": alpha, "dropout": float(config.get("lora_dropout") or 0.0), **variant,
            "slots": ["weight"], "base_class": "Linear" if kind == "linear" else "Conv2d", **geometry}


def _split_keys(where: str, tensors: dict[str, torch.Tensor]):
    """Strip the ``base_model.model.`` prefix; split into {module: {"A", "B"}} pairs and the other tensors."""
    prefixed = [k.startswith(PREFIX) for k in tensors]
    if any(prefixed) and not all(prefixed):
        raise PeftFormatError(f"{where}: some keys start with {PREFIX!r} and some do not (e.g. "
                              f"{list(tensors)[prefixed.index(False)]!r}); a PEFT file uses one form")
    if prefixed and all(prefixed):
        tensors = {k[len(PREFIX):]: t for k, t in tensors.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if key.endswith(".lora_magnitude_vector"):  # DoRA's magnitude, no ".weight" suffix
            pairs.setdefault(key[:-len(".lora_magnitude_vector")], {})["m"] = t
            continue
        if ".lora_embedding_" in key:
            raise PeftFormatError(f"{where}: {key} is an Embedding adapter; peftlite adapts Linear and Conv2d")
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
        elif ".lora_" in key:
            raise PeftFormatError(f"{where}: {key!r} is not a lora_A/lora_B weight peftlite can read (an "
                                  "adapter name left in the key, or a lora_B bias?)")
        else:
            rest[key] = t
    for name, ab in pairs.items():
        if not {"A", "B"} <= set(ab):
            raise PeftFormatError(f"{where}: {name} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return pairs, rest


def _factored_layers(where: str, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                     modules: dict[str, nn.Module] | None):
    """A PEFT LoHa or LoKr adapter's layers as peftlite entries and tensors, and its other tensors.

    PEFT stores a conv's factors flat (r, in·kh·kw), so only the model tells a conv from a Linear: reading one
    needs the model. The Tucker forms (``use_effective_conv2d``: ``hada_t1``/``hada_t2``, ``lokr_t2``, each a
    core (r, r, kh, kw) between ``w_a`` (r, out) and ``w_b`` (r, in)) are read as peftlite's Tucker form
    (``AdapterSpec.tucker``: ``T`` = the core (r, r, kh·kw), ``D`` = ``w_b``, ``B`` = ``w_aᵀ``). A LoKr
    layer's split (and which factors are full) is read from its tensors' shapes.
    """
    peft_type = config["peft_type"]
    pattern, names, tucker, kind = _FACTORED[peft_type]
    if modules is None:
        raise PeftFormatError(f"{where}: a PEFT {peft_type} adapter stores conv factors flat, so reading it needs "
                              "the model: peftlite.load(model, dir)")
    if any(k.startswith(PREFIX) for k in tensors):
        tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: t for k, t in tensors.items()}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m:
            factors.setdefault(m["module"], {})[m["part"]] = t
        else:
            rest[key] = t
    factors = {name: _untucked(where, name, f, tucker, names) for name, f in factors.items()}
    layers, out = {}, {}
    for name, f in factors.items():
        if name not in modules:
            raise PeftFormatError(f"{where}: the adapter has a layer {name!r} that the model does not have")
        module = modules[name]
        layer_kind = "conv2d" if issubclass(plain_type(module), nn.Conv2d) else "linear"
        _check_module(where, name, module, layer_kind)
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["alpha"]))
        f = {k: t if k[0] == "T" else t.reshape(t.shape[0], -1) for k, t in f.items()}  # a conv's lokr_w2: flat
        spec = _factored_spec(where, name, kind, f, r)
        want = {k.rsplit(".", 1)[1]: shape for k, shape in schema.adapter_keys(name, module, spec).items()}
        shapes = {k: tuple(t.shape) for k, t in f.items()}
        if shapes != want:
            raise PeftFormatError(f"{where}: {name} has {peft_type} factors {shapes}, which do not fit the model's "
                                  f"{type(module).__name__} at rank {r} ({want} as peftlite stores them)")
        layers[name] = {"kind": layer_kind, **spec.replace(alpha=alpha).entry(), "slots": ["weight"],
                        "base_class": "Linear" if layer_kind == "linear" else "Conv2d", **schema.layer_geometry(module)}
        out.update({f"{name}.lora.{DEFAULT_ADAPTER}.{k}": t for k, t in f.items()})
    return layers, out, rest


def _untucked(where: str, name: str, parts: dict[str, torch.Tensor], tucker: tuple[str, ...],
              names: dict[str, str]) -> dict[str, torch.Tensor]:
    """One layer's PEFT factors under peftlite's names; a Tucker triple (core ``t<i>`` (r, r, kh, kw) with
    ``w<i>_a`` (r, out) and ``w<i>_b`` (r, in)) as ``T<i>`` (r, r, kh·kw), ``B<i> = w<i>_aᵀ``, ``D<i> = w<i>_b``."""
    out, used = {}, set()
    for part, t in parts.items():
        if part in tucker:
            i = part[1]
            a, b = parts.get(f"w{i}_a"), parts.get(f"w{i}_b")
            if a is None or b is None or t.dim() != 4 or a.dim() != 2 or b.dim() != 2 or t.shape[1] != b.shape[0] \
                    or t.shape[0] != a.shape[0]:
                raise PeftFormatError(f"{where}: {name} has a Tucker core {part} {tuple(t.shape)} without the "
                                      f"w{i}_a (r, out) and w{i}_b (r, in) it sits between")
            out[f"B{i}"], out[f"T{i}"], out[f"D{i}"] = a.t(), t.reshape(t.shape[0], t.shape[1], -1), b
            used |= {f"w{i}_a", f"w{i}_b"}
    for part, t in parts.items():
        if part in names and part not in used:
            out[names[part]] = t
    return out


def _factored_spec(where: str, name: str, kind: str, f: dict[str, torch.Tensor], r: int) -> AdapterSpec:
    """The spec of one LoHa / LoKr layer read from its (flat) factors; the rank each low-rank factor has must be
    the config's ``r``."""
    tucker = "T1" in f or "T2" in f
    if kind == "loha":
        if set(f) != ({"T1", "D1", "B1", "T2", "D2", "B2"} if tucker else {"A1", "B1", "A2", "B2"}):
            raise PeftFormatError(f"{where}: {name} has LoHa factors {sorted(f)}, not all four hada_w1/w2 a/b (and "
                                  "both cores hada_t1/t2 in the Tucker form)")
        full = None
    else:
        full = ("W1" in f, "W2" in f)
        parts = [{"W1"} if full[0] else {"A1", "B1"}, {"W2"} if full[1] else {"T2", "D2", "B2"} if tucker else
                 {"A2", "B2"}]
        if set(f) != parts[0] | parts[1]:
            raise PeftFormatError(f"{where}: {name} has LoKr factors {sorted(f)}, not lokr_w1 or lokr_w1_a/b and "
                                  "lokr_w2 or lokr_w2_a/b (with lokr_t2 in the Tucker form)")
    ranks = {f[k].shape[0] for k in ("A1", "A2", "T1", "T2") if k in f}
    if ranks - {r}:
        raise PeftFormatError(f"{where}: {name} has rank {sorted(ranks)}, but the config's r / rank_pattern gives "
                              f"it rank {r}")
    kron = None
    if kind == "lokr":
        kron = ((f["W1"] if full[0] else f["B1"]).shape[0], (f["W1"] if full[0] else f["A1"]).shape[1])
    return AdapterSpec(rank=r, kind=kind, kron=kron, full=full, tucker=tucker)


def from_peft(tensors: dict[str, torch.Tensor], config: dict[str, Any], where: str = "<peft>",
              model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Translate a PEFT adapter to peftlite's ``(tensors, config)``; checks it against ``model`` if given.

    Raises:
        PeftFormatError: an unsupported PEFT feature (named), or an adapter that contradicts itself or
            does not fit the model.
    """
    _check_config(where, config)
    modules = dict(model.named_modules()) if model is not None else None
    target_modules = config.get("target_modules")
    if config["peft_type"] in _FACTORED:
        layers, out, rest = _factored_layers(where, tensors, config, modules)
        pairs = {}
    else:
        pairs, rest = _split_keys(where, tensors)
        layers, out = {}, {}
    for name in layers:
        if target_modules is not None and not _targeted(target_modules, name):
            raise PeftFormatError(f"{where}: {name} has adapter tensors but target_modules "
                                  f"{target_modules!r} does not select it; the adapter is inconsistent")
    for name, ab in pairs.items():
        if target_modules is not None and not _targeted(target_modules, name):
            raise PeftFormatError(f"{where}: {name} has adapter tensors but target_modules "
                                  f"{target_modules!r} does not select it; the adapter is inconsistent")
        if modules is not None and name not in modules:
            raise PeftFormatError(f"{where}: the adapter has a layer {name!r} that the model does not have")
        a, b = ab["A"], ab["B"]
        layers[name] = _layer(where, name, a, b, config, modules[name] if modules is not None else None)
        out[f"{name}.lora.{DEFAULT_ADAPTER}.A"] = a.reshape(a.shape[0], -1)  # (r, in*kh*kw)
        out[f"{name}.lora.{DEFAULT_ADAPTER}.B"] = b.reshape(b.shape[0], a.shape[0])  # (out, r)
        if bool(config.get("use_dora")) != ("m" in ab):
            raise PeftFormatError(f"{where}: {name} {'lacks' if config.get('use_dora') else 'has'} a DoRA "
                                  f"lora_magnitude_vector while use_dora is {bool(config.get('use_dora'))}")
        if "m" in ab:
            if ab["m"].numel() != b.shape[0]:
                raise PeftFormatError(f"{where}: {name} has a magnitude of shape {tuple(ab['m'].shape)} for "
                                      f"{b.shape[0]} outputs")
            out[f"{name}.lora.{DEFAULT_ADAPTER}.magnitude"] = ab["m"].reshape(-1)  # (out,)
    save = config.get("modules_to_save") or []
    trainable: list[str] = []
    for key, t in rest.items():
        owner = _owner(key, save)
        if owner is None:
            raise PeftFormatError(f"{where}: tensor {key!r} is neither a LoRA weight nor under modules_to_save {save}")
        if modules is not None and owner not in modules:
            raise PeftFormatError(f"{where}: modules_to_save module {owner!r} is not in the model")
        trainable += [owner] if owner not in trainable else []
        out[key] = t
    if not out:
        raise PeftFormatError(f"{where}: holds no LoRA or modules_to_save tensors")
    source = {"format": "peft", "peft_version": config.get("peft_version"),
              "base_model_name_or_path": config.get("base_model_name_or_path")}
    return out, schema.validate(schema.file_config(layers, {}, trainable, False, False, source=source), where)


def folder_of(path: str | os.PathLike, name: str | None) -> str:
    """The folder of adapter ``name`` in a PEFT directory: ``path/name`` when PEFT saved it there (its
    ``save_pretrained`` puts every adapter but the default in a subfolder of its name), else ``path``."""
    path = os.fspath(path)
    if name is not None and os.path.isfile(os.path.join(path, name, CONFIG_NAME)):
        return os.path.join(path, name)
    return path


def read(path: str | os.PathLike, model: nn.Module | None = None, name: str | None = None
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a PEFT adapter directory (its adapter ``name``'s subfolder, if it has one) as ``(tensors, config)``.

    With ``model``, every layer is checked against the model's (type, shape, PEFT-exact geometry) and
    conv geometry comes from the model; without, conv stride/padding/dilation/padding_mode are null.
    """
    path = folder_of(path, name)
    tensors, config = read_raw(path)
    return from_peft(tensors, config, path, model)


# ---- writing a PEFT directory -------------------------------------------------------------------

def check_direct_reads(model: nn.Module, names: list[str], where: str = "save") -> None:
    """Refuse layers whose weight an enclosing module's forward computes with: PEFT would bypass them.

    torchvision's Swin passes ``qkv.weight`` and ``proj.weight`` to a function; with PEFT those adapters
    have no effect and get no gradient, so a PEFT directory would not reproduce peftlite's outputs.
    Reads of the weight's metadata only (T5's ``self.wo.weight.dtype``) are fine.
    """
    for name in names:
        reader = _direct_reads.reader_of(model, name)
        if reader is not None:
            holder, attribute = reader
            raise PeftFormatError(
                f"{where}: {holder}.forward reads {attribute}.weight directly and computes with its values, so "
                f"PEFT would bypass the adapter on {name}; save this model in peftlite format")


def _anchored(name: str) -> str:
    """A rank/alpha_pattern key that PEFT matches to exactly this module (its keys match dotted suffixes)."""
    return "^" + re.escape(name)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def to_peft(tensors: dict[str, torch.Tensor], config: dict[str, Any], where: str = "save"
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Translate peftlite's ``(tensors, config)`` to PEFT's safetensors tensors and adapter_config.json.

    Raises:
        PeftFormatError: a layer or setting PEFT cannot express or would compute differently (named).
    """
    schema.check_exportable(config, where, PeftFormatError, "a PEFT directory")
    layers = config["layers"]
    kinds = {e.get("adapter_kind", "lora") for e in layers.values()}
    if len(kinds) > 1:
        raise PeftFormatError(f"{where}: the adapter has {' and '.join(sorted(kinds))} layers; a PEFT directory holds "
                              "one method (peft_type), so save it in peftlite format")
    factored = next(iter(kinds)) if kinds & {"loha", "lokr"} else None  # LoHa or LoKr: PEFT's LyCORIS types
    label = {"loha": "LoHa", "lokr": "LoKr"}.get(factored)
    for name, e in layers.items():
        if factored and (e.get("rank_scaling", "linear") != "linear" or e.get("dropout", 0.0)):
            raise PeftFormatError(f"{where}: {name} is a {label} layer with rank_scaling={e.get('rank_scaling')!r}, "
                                  f"dropout={e.get('dropout')}; PEFT's {label} scales by alpha / r and has no input "
                                  "dropout, so save it in peftlite format")
        if e.get("kind") == "mha":
            raise PeftFormatError(f"{where}: {name} is an adapted nn.MultiheadAttention, which PEFT's LoRA "
                                  "format does not express; save it in peftlite format")
        if e.get("base_class") not in ("Linear", "Conv2d"):
            raise PeftFormatError(
                f"{where}: {name} is a {e.get('base_class')} (a Linear/Conv2d subclass); PEFT would not compute "
                "it as peftlite does (its own forward, or a parent that reads its weight), so it is refused")
        if e.get("slots", ["weight"]) != ["weight"]:
            raise PeftFormatError(f"{where}: {name} adapts {e['slots']}; PEFT adapts a layer's weight only")
        if e["kind"] == "conv2d":
            if e.get("groups", 1) != 1:
                raise PeftFormatError(f"{where}: {name} is a grouped conv (groups={e['groups']}); PEFT's "
                                      "grouped-conv LoRA is not a valid grouped update, so it cannot be written")
            if e.get("dilation") not in (None, [1, 1]) or e.get("padding_mode") not in (None, "zeros"):
                raise PeftFormatError(
                    f"{where}: {name} has dilation={e.get('dilation')}, padding_mode={e.get('padding_mode')!r}; "
                    "PEFT's LoRA conv drops both, so PEFT would compute this layer wrongly")
    heads = list(config.get("heads") or {})
    save = heads + [t for t in config.get("trainable") or [] if t not in heads]
    for name in layers:
        if any(name == s or name.startswith(s + ".") for s in save):
            raise PeftFormatError(f"{where}: {name} is adapted inside the fully trained module "
                                  f"{next(s for s in save if name.startswith(s))!r}; PEFT cannot express both")
    dora = {e.get("variant", "lora") == "dora" for e in layers.values()}
    if len(dora) > 1:
        raise PeftFormatError(f"{where}: the adapter has DoRA and plain LoRA layers; PEFT's use_dora is one flag for "
                              "all of them, so save it in peftlite format")
    rslora = all(e.get("rank_scaling", "linear") == "sqrt" for e in layers.values()) and bool(layers)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    adapter = schema.adapter_name(config)
    for name, e in layers.items():
        r = int(e["rank"])
        ranks[name], alphas[name] = r, float(e["alpha"])
        if factored:  # PEFT keeps the conv factors flat, as peftlite does, but for LoKr's full W2 and the cores
            prefix, parts = ("hada_", _HADA_NAMES) if factored == "loha" else ("lokr_", _LOKR_NAMES)
            mine = {k.rsplit(".", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{name}.lora.{adapter}.")}
            for i in (1, 2):  # the Tucker form: t<i> (r, r, kh, kw), w<i>_a = B<i>ᵀ (r, out), w<i>_b = D<i>
                if f"T{i}" in mine:
                    core = mine.pop(f"T{i}")
                    out[f"{PREFIX}{name}.{prefix}t{i}"] = core.reshape(*core.shape[:2], *e["kernel_size"])
                    out[f"{PREFIX}{name}.{prefix}w{i}_a"] = mine.pop(f"B{i}").t()
                    out[f"{PREFIX}{name}.{prefix}w{i}_b"] = mine.pop(f"D{i}")
            for part, ours in parts.items():
                t = mine.get(ours)
                if t is not None and ours == "W2" and e["kind"] == "conv2d":
                    t = t.reshape(t.shape[0], -1, *e["kernel_size"])  # (out_k, in_n, kh, kw)
                if t is not None:
                    out[f"{PREFIX}{name}.{prefix}{part}"] = t
            continue
        a = tensors[f"{name}.lora.{adapter}.A"]
        b = tensors[f"{name}.lora.{adapter}.B"]
        if e["kind"] == "conv2d":
            kh, kw = e["kernel_size"]
            a = a.reshape(r, e["in_channels"], kh, kw)
            b = b.reshape(b.shape[0], r, 1, 1)
        out[f"{PREFIX}{name}.lora_A.weight"] = a
        out[f"{PREFIX}{name}.lora_B.weight"] = b
        if e.get("variant") == "dora":
            m = tensors[f"{name}.lora.{adapter}.magnitude"]
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.reshape(1, -1, 1, 1) if e["kind"] == "conv2d" else m
        # a layer's scale, in the flag PEFT will read: alpha/sqrt(r) with use_rslora, else alpha/r
        sqrt = e.get("rank_scaling", "linear") == "sqrt"
        ranks[name] = r
        alphas[name] = float(e["alpha"]) * (math.sqrt(r) if sqrt and not rslora else 1.0)
    for key, t in tensors.items():
        if schema.adapter_layer(key, layers) is None:
            out[PREFIX + key] = t
    r_default = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha_default = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r_default)
    dropouts = {float(e.get("dropout", 0.0)) for e in layers.values()}
    targets = "|".join(re.escape(n) for n in layers)
    if factored:
        return out, {
            "peft_type": factored.upper(), "task_type": None, "base_model_name_or_path": None,
            "r": r_default, "alpha": _number(alpha_default),
            "target_modules": f"^(?:{targets})$" if layers else None,
            "rank_pattern": {_anchored(n): r for n, r in ranks.items() if r != r_default},
            "alpha_pattern": {_anchored(n): _number(a) for n, a in alphas.items() if a != alpha_default},
            "modules_to_save": save or None, "rank_dropout": 0.0, "module_dropout": 0.0,
            "use_effective_conv2d": _tucker_flag(where, layers), "init_weights": True, "inference_mode": True,
            **(_lokr_split(where, layers) if factored == "lokr" else {}),
        }
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r_default,
        "lora_alpha": _number(alpha_default),
        "lora_dropout": max(dropouts) if dropouts else 0.0,  # PEFT has one; it only matters in training
        "target_modules": f"^(?:{targets})$" if layers else None,
        "rank_pattern": {_anchored(n): r for n, r in ranks.items() if r != r_default},
        "alpha_pattern": {_anchored(n): _number(a) for n, a in alphas.items() if a != alpha_default},
        "modules_to_save": save or None,
        "bias": "none",
        "use_rslora": rslora,  # rsLoRA and plain layers mixed: every alpha written for alpha / r
        "use_dora": dora == {True},
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return out, adapter_config


def _tucker_flag(where: str, layers: dict[str, dict[str, Any]]) -> bool:
    """PEFT's ``use_effective_conv2d`` for a LoHa / LoKr adapter: one flag that puts every kh×kw conv in the
    Tucker form on loading (a LoKr conv's only when its W2 is low-rank), so the layers must agree.

    Raises:
        PeftFormatError: some kh×kw convs in the Tucker form and some not.
    """
    convs = {n: e for n, e in layers.items() if e["kind"] == "conv2d" and list(e["kernel_size"]) != [1, 1]
             and not (e.get("adapter_kind") == "lokr" and (e.get("full") or [False, False])[1])}
    tucker = {n for n, e in convs.items() if e.get("tucker")}
    if tucker and tucker != set(convs):
        plain = sorted(set(convs) - tucker)
        raise PeftFormatError(f"{where}: {sorted(tucker)[0]} is in the Tucker form and {plain[0]} is not; PEFT's "
                              "use_effective_conv2d is one flag for every kh×kw conv, so save it in peftlite format")
    return bool(tucker)


def _lokr_split(where: str, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """PEFT's ``decompose_factor`` and ``decompose_both`` that make every layer's LoKr split again on loading.

    PEFT has one pair of them for the whole adapter and splits each layer by them, so the files' splits must
    all be that one rule's; the candidates are -1 and every split size the layers have.

    Raises:
        PeftFormatError: no one pair gives every layer's split (layers wrapped with different factors, or
            read from a LyCORIS file, whose rule differs).
    """
    fits = {}
    for name, e in layers.items():
        spec = AdapterSpec.from_entry(e, name)
        fan_out = e.get("out_features", e.get("out_channels"))
        fan_in = e.get("in_features", e.get("in_channels", 0) // e.get("groups", 1))
        fits[name] = (spec, fan_out, fan_in)
    candidates = [-1] + sorted({k for spec, *_ in fits.values() for k in spec.kron})
    for factor in candidates:
        for both in (False, True):
            rule = {"kron": None, "full": None, "decompose_factor": factor, "decompose_both": both}
            if all(lokr.layout(spec.replace(**rule), fan_in, fan_out, 1) == (spec.kron, spec.full)
                   for spec, fan_out, fan_in in fits.values()):
                return {"decompose_factor": factor, "decompose_both": both}
    raise PeftFormatError(f"{where}: no one decompose_factor / decompose_both gives every layer's LoKr split "
                          f"({ {n: [list(s.kron), list(s.full)] for n, (s, *_) in fits.items()} }), and PEFT splits "
                          "every layer by one such pair on loading; save it in peftlite format")


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], adapter_config: dict[str, Any],
          dtype: torch.dtype | None = None) -> str:
    """Write a PEFT adapter directory atomically (``_safetensors.write_folder``): weights first, config last."""
    out = file_tensors(tensors, dtype)

    def weights(p: str) -> None:
        save_file(out, p, metadata={"format": "pt"})

    def config(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")

    return write_folder(path, {WEIGHTS_NAME: weights, CONFIG_NAME: config}, "save")
