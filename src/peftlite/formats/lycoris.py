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

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import DEFAULT_ADAPTER, AdaptedLayer, registry
from ..layers import spec as _spec
from ..layers.spec import AdapterSpec
from . import _direct_reads, schema
from ._lycoris_names import (
    DEFAULT_PREFIX,
    LycorisFormatError,
    check_prefix,
    module_index,
    prefix_of,
    resolve,
    select,
    underscored,
)
from ._safetensors import file_tensors, read_file, write_file

__all__ = ["LycorisFormatError", "from_lycoris", "looks_like", "read", "to_lycoris", "tucker_in", "write"]

# The suffixes of each algorithm peftlite reads (besides "alpha"), and those of the ones it refuses, by name.
SUFFIXES = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
REFUSED = {
    "dora_scale": "DoRA-weighted (dora_wd) adapters",
    "oft_blocks": "OFT / BOFT (diag-oft, boft)", "rescale": "OFT / BOFT (diag-oft, boft)",
    **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "GLoRA (glora)"),
    "on_input": "(IA)³ (ia3)", "weight": "(IA)³ (ia3)",
    "diff": "full fine-tuning (full)", "diff_b": "full fine-tuning (full)",
    "w_norm": "trained norm layers (train_norm)", "b_norm": "trained norm layers (train_norm)",
    **dict.fromkeys(("lambda_layer", "q_layer.weight", "p_layer.weight"), "T-LoRA (tlora)"),
    "lokr_t1": "LoKr with a Tucker W1 (lokr_t1), which LyCORIS never writes",
}
_DISTINCT = {s for ss in SUFFIXES.values() for s in ss} | (set(REFUSED) - {"weight"})


def looks_like(keys) -> bool:
    """Do these safetensors keys look like a LyCORIS / kohya file (``<prefix>_<module>.<suffix>``)?"""
    for key in keys:
        lora_name, dot, suffix = key.partition(".")
        if dot and (suffix in _DISTINCT or (suffix in ("alpha", "weight") and prefix_of(lora_name))):
            return True
    return False


def tucker_in(core: Tensor, factor: Tensor) -> Tensor:
    """A Tucker core with its input factor contracted in, as one flat factor (computed in fp64).

    Args:
        core: (r, r', kh, kw).
        factor: (r', c).
    Returns:
        (r, c·kh·kw): ``out[a, (c, h, w)] = Σ_b core[a, b, h, w] · factor[b, c]``, in at least fp32.
    """
    out = torch.einsum("abhw,bc->achw", core.double(), factor.double())  # (r, c, kh, kw)
    return out.reshape(core.shape[0], -1).to(torch.promote_types(core.dtype, torch.float32))


# ---- reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    """One file entry being read: where, its module name in the file and in the model, and the module."""

    where: str
    lora_name: str
    path: str
    module: nn.Module

    @property
    def dims(self) -> tuple[int, int, tuple[int, ...]]:
        """``(out, in/groups, kernel)``: the weight's shape, kernel () for a Linear."""
        w = self.module.weight
        return w.shape[0], w.shape[1], tuple(w.shape[2:])

    def expect(self, suffix: str, t: Tensor, shape: tuple[int, ...], why: str) -> None:
        if tuple(t.shape) != tuple(shape):
            out, in_g, k = self.dims
            what = f"nn.Linear({in_g}, {out})" if not k else f"a Conv2d of {in_g} input channels per group, " \
                                                               f"{out} outputs, kernel {k}"
            raise LycorisFormatError(f"{self.where}: {self.lora_name}.{suffix} has shape {tuple(t.shape)}, but the "
                                     f"model's {self.path} ({what}) {why} needs {tuple(shape)}")

    def fail(self, what: str) -> LycorisFormatError:
        return LycorisFormatError(f"{self.where}: {self.lora_name}: {what}")

    def rank(self, suffix: str, t: Tensor, dim: int) -> int:
        if t.dim() <= dim or t.shape[dim] < 1:
            raise self.fail(f"{suffix} has shape {tuple(t.shape)}, which gives no rank")
        return int(t.shape[dim])


def _alpha(layer: _Layer, t: Tensor | None, rank: int) -> float:
    """The file's alpha as a number; missing or 0: the rank (scale 1), as LyCORIS and kohya read it."""
    if t is None:
        return float(rank)
    if t.numel() != 1 or t.dtype == torch.bool:
        raise layer.fail(f"alpha has shape {tuple(t.shape)}; it must be one number")
    alpha = float(t.reshape(()).double())
    if alpha == 0:
        return float(rank)
    if not math.isfinite(alpha) or alpha < 0:
        raise layer.fail(f"alpha is {alpha}; peftlite reads a positive finite alpha (or 0, meaning the rank)")
    return alpha


def _read_lora(layer: _Layer, parts: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    out, in_g, k = layer.dims
    down, up, mid = parts["lora_down.weight"], parts["lora_up.weight"], parts.get("lora_mid.weight")
    r = layer.rank("lora_down.weight", down, 0)
    at = f"at rank {r} (lora_down's rows)"
    ones = (1,) * len(k)
    layer.expect("lora_up.weight", up, (out, r, *ones), at)
    if mid is None:
        layer.expect("lora_down.weight", down, (r, in_g, *k), at)
        a = down.reshape(r, -1)
    elif not k:
        raise layer.fail("has lora_mid.weight (LoCon's Tucker core), but the model's layer is a Linear")
    else:
        layer.expect("lora_down.weight", down, (r, in_g, *ones), f"{at}, with a Tucker core,")
        layer.expect("lora_mid.weight", mid, (r, r, *k), at)
        a = tucker_in(mid, down.reshape(r, in_g))
    return {"kind": "lora", "rank": r, "alpha": _alpha(layer, parts.get("alpha"), r)}, \
        {"A": a, "B": up.reshape(out, r)}


def _read_loha(layer: _Layer, parts: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    out, in_g, k = layer.dims
    fan_in = in_g * math.prod(k)
    r = layer.rank("hada_w1_b", parts["hada_w1_b"], 0)
    at = f"at rank {r} (hada_w1_b's rows)"
    tucker = [s for s in ("hada_t1", "hada_t2") if s in parts]
    if tucker and (len(tucker) < 2 or not k):
        raise layer.fail(f"has {' and '.join(tucker)} (LoHa's Tucker cores): both are needed, on a Conv2d layer")
    factors = {}
    for i in ("1", "2"):
        w_a, w_b = parts[f"hada_w{i}_a"], parts[f"hada_w{i}_b"]
        if tucker:
            layer.expect(f"hada_t{i}", parts[f"hada_t{i}"], (r, r, *k), at)
            layer.expect(f"hada_w{i}_a", w_a, (r, out), f"{at}, Tucker form,")
            layer.expect(f"hada_w{i}_b", w_b, (r, in_g), f"{at}, Tucker form,")
            factors[f"A{i}"], factors[f"B{i}"] = tucker_in(parts[f"hada_t{i}"], w_b), w_a.t()
        else:
            layer.expect(f"hada_w{i}_a", w_a, (out, r), at)
            layer.expect(f"hada_w{i}_b", w_b, (r, fan_in), at)
            factors[f"A{i}"], factors[f"B{i}"] = w_b, w_a
    return {"kind": "loha", "rank": r, "alpha": _alpha(layer, parts.get("alpha"), r)}, factors


def _read_lokr(layer: _Layer, parts: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if "lokr" not in _spec.KINDS:
        raise layer.fail("is a LoKr entry (lokr_w1...), and this peftlite has no LoKr adapters")
    out, in_g, k = layer.dims
    kernel = math.prod(k)
    for half in ("W1", "W2"):
        full, pair = f"lokr_w{half[1]}", (f"lokr_w{half[1]}_a", f"lokr_w{half[1]}_b")
        given = [s for s in (full, *pair) if s in parts]
        if given not in ([full], list(pair)):
            raise layer.fail(f"has {', '.join(given) or 'nothing'} for LoKr's {half}: it needs {full}, or both of "
                             f"{' and '.join(pair)}")
    w1_full, w2_full = "lokr_w1" in parts, "lokr_w2" in parts
    tucker = "lokr_t2" in parts
    if tucker and (w2_full or not k):
        raise layer.fail("has lokr_t2 (a Tucker W2), which needs a low-rank W2 (lokr_w2_a, lokr_w2_b) on a Conv2d")
    w1 = [parts[s] for s in (("lokr_w1",) if w1_full else ("lokr_w1_a", "lokr_w1_b"))]
    if any(t.dim() != 2 or 0 in t.shape for t in w1):
        raise layer.fail(f"W1 has shapes {', '.join(str(tuple(t.shape)) for t in w1)}; LoKr's W1 (or its factors) "
                         "are matrices")
    out_l, in_m = w1[0].shape[0], w1[-1].shape[1]
    if out % out_l or in_g % in_m:
        raise layer.fail(f"W1 of shape ({out_l}, {in_m}) does not split the model's {layer.path} ({out} outputs, "
                         f"{in_g} input channels per group): out_l must divide the one, in_m the other")
    out_k, in_n = out // out_l, in_g // in_m
    if not w1_full:
        r = layer.rank("lokr_w1_a", parts["lokr_w1_a"], 1)
    elif not w2_full:
        r = layer.rank("lokr_w2_a", parts["lokr_w2_a"], 0 if tucker else 1)
    else:
        r = 1
    at = f"with W1 ({out_l}, {in_m}) at rank {r}"
    tensors = {}
    if w1_full:
        tensors["W1"] = parts["lokr_w1"]
    else:
        layer.expect("lokr_w1_a", parts["lokr_w1_a"], (out_l, r), at)
        layer.expect("lokr_w1_b", parts["lokr_w1_b"], (r, in_m), at)
        tensors["B1"], tensors["A1"] = parts["lokr_w1_a"], parts["lokr_w1_b"]
    if w2_full:
        w2 = parts["lokr_w2"]
        if tuple(w2.shape) != (out_k, in_n * kernel):
            layer.expect("lokr_w2", w2, (out_k, in_n, *k), at)
        tensors["W2"] = w2.reshape(out_k, -1)
    elif tucker:
        layer.expect("lokr_t2", parts["lokr_t2"], (r, r, *k), at)
        layer.expect("lokr_w2_a", parts["lokr_w2_a"], (r, out_k), f"{at}, Tucker form,")
        layer.expect("lokr_w2_b", parts["lokr_w2_b"], (r, in_n), f"{at}, Tucker form,")
        tensors["B2"], tensors["A2"] = parts["lokr_w2_a"].t(), tucker_in(parts["lokr_t2"], parts["lokr_w2_b"])
    else:
        w2_b = parts["lokr_w2_b"]
        layer.expect("lokr_w2_a", parts["lokr_w2_a"], (out_k, r), at)
        if tuple(w2_b.shape) != (r, in_n * kernel):
            layer.expect("lokr_w2_b", w2_b, (r, in_n, *k), at)
        tensors["B2"], tensors["A2"] = parts["lokr_w2_a"], w2_b.reshape(r, -1)
    alpha = float(r) if w1_full and w2_full else _alpha(layer, parts.get("alpha"), r)
    return {"kind": "lokr", "rank": r, "alpha": alpha, "kron": (out_l, in_m), "full": (w1_full, w2_full)}, tensors


_READERS = {"lora": _read_lora, "loha": _read_loha, "lokr": _read_lokr}
_REQUIRED = {"lora": ("lora_down.weight", "lora_up.weight"),
             "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "lokr": ()}  # LoKr's: _read_lokr checks


def _algorithm(where: str, lora_name: str, parts: dict[str, Tensor]) -> str:
    """Which algorithm an entry's suffixes are; unknown, refused, mixed or incomplete ones raise, named."""
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
    missing = [s for s in _REQUIRED[algos[0]] if s not in parts]
    if missing:
        raise LycorisFormatError(f"{where}: {lora_name} is a {algos[0]} entry without {', '.join(missing)}")
    return algos[0]


def _entry(module: nn.Module, fields: dict[str, Any]) -> dict[str, Any]:
    """The peftlite layer entry of a module adapted as ``fields`` (AdapterSpec's) say."""
    fields = dict(fields)
    spec = AdapterSpec(rank=fields.pop("rank"), alpha=fields.pop("alpha"), kind=fields.pop("kind"), **fields)
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
        fields, factors = _READERS[algo](_Layer(where, lora_name, path, module), parts)
        layers[path] = _entry(module, fields)
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
        twins = [n for n in index.get(underscored(name), [])
                 if n != name and isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d))]
        if twins:
            raise LycorisFormatError(f"{where}: {name} and {', '.join(twins)} share the LyCORIS name "
                                     f"{prefix}_{underscored(name)}, so a reader could not tell them apart")
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


def _write_lora(e: dict[str, Any], t: dict[str, Tensor], spec: AdapterSpec) -> dict[str, Tensor]:
    a, b = t["A"], t["B"]
    if e["kind"] == "conv2d":
        kh, kw = e["kernel_size"]
        a = a.reshape(spec.rank, e["in_channels"] // e["groups"], kh, kw)  # (r, in/g, kh, kw)
        b = b.reshape(b.shape[0], spec.rank, 1, 1)  # (out, r, 1, 1)
    return {"lora_down.weight": a, "lora_up.weight": b}


def _write_loha(e: dict[str, Any], t: dict[str, Tensor], spec: AdapterSpec) -> dict[str, Tensor]:
    return {"hada_w1_a": t["B1"], "hada_w1_b": t["A1"], "hada_w2_a": t["B2"], "hada_w2_b": t["A2"]}


def _write_lokr(e: dict[str, Any], t: dict[str, Tensor], spec: AdapterSpec) -> dict[str, Tensor]:
    out = {}
    if "W1" in t:
        # both factors full: LyCORIS applies scale 1, so the scale goes into W1
        out["lokr_w1"] = t["W1"] * spec.scale if "W2" in t else t["W1"]
    else:
        out["lokr_w1_a"], out["lokr_w1_b"] = t["B1"], t["A1"]
    if "W2" in t:
        w2 = t["W2"]
        out["lokr_w2"] = w2.reshape(w2.shape[0], -1, *e["kernel_size"]) if e["kind"] == "conv2d" else w2
    else:
        out["lokr_w2_a"], out["lokr_w2_b"] = t["B2"], t["A2"]  # w2_b flat (r, in_n·kh·kw), as LyCORIS keeps it
    return out


_WRITERS = {"lora": _write_lora, "loha": _write_loha, "lokr": _write_lokr}


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
    if config.get("train_bn"):
        raise LycorisFormatError(f"{where}: the adapter trains BatchNorm statistics (train_bn=True), which a LyCORIS "
                                 "file does not hold; save it in peftlite format")
    if config.get("partial"):
        raise LycorisFormatError(f"{where}: a partial adapter (saved with include=) cannot be written as a LyCORIS "
                                 "file, which holds every layer's factors")
    adapter = schema.adapter_name(config)
    out: dict[str, Tensor] = {}
    seen: dict[str, str] = {}
    for name, e in config["layers"].items():
        _check_layer(where, name, e)
        lora_name = f"{prefix}_{underscored(name)}"
        if lora_name in seen:
            raise LycorisFormatError(f"{where}: {seen[lora_name]} and {name} share the LyCORIS name {lora_name}")
        seen[lora_name] = name
        spec = AdapterSpec.from_entry(e, f"layer {name!r}")
        head = f"{name}.lora.{adapter}."
        mine = {k[len(head):]: t for k, t in tensors.items() if k.startswith(head)}
        for suffix, t in _WRITERS[spec.kind](e, mine, spec).items():
            out[f"{lora_name}.{suffix}"] = t
        full = spec.kind == "lokr" and all(e.get("full") or (False, False))
        alpha = spec.rank if full else spec.scale * spec.rank  # rsLoRA: the alpha that gives its scale
        out[f"{lora_name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if not out:
        raise LycorisFormatError(f"{where}: the adapter has no layers to write")
    return out


def write(path: str | os.PathLike, tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> str:
    """Write a LyCORIS file atomically; factors in ``dtype`` if given, alphas always float32."""
    out = file_tensors({k: t for k, t in tensors.items() if not k.endswith(".alpha")}, dtype)
    out.update(file_tensors({k: t for k, t in tensors.items() if k.endswith(".alpha")}))
    return write_file(path, out, {"format": "pt"}, "save")
