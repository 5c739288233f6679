"""Each LyCORIS algorithm's factors as peftlite holds them, both ways: one reader and one writer per algorithm.

A reader takes one file entry (its tensors by suffix) and the model's layer, checks every shape against the
layer and the entry's rank, and returns the ``AdapterSpec`` (rank, an alpha that gives LyCORIS's scale, LoKr's
split) with peftlite's flat factors; a writer does the reverse. The key-by-key table: ``formats/lycoris.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional import tucker_in
from ..layers import spec as _spec
from ..layers.spec import AdapterSpec
from ._lycoris_names import LycorisFormatError

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


@dataclass(frozen=True)
class Entry:
    """One file entry being read: the file, the entry's name there, the module's path in the model, the module,
    and the entry's tensors by suffix."""

    where: str
    lora_name: str
    path: str
    module: nn.Module
    parts: dict[str, Tensor]

    @property
    def dims(self) -> tuple[int, int, tuple[int, ...]]:
        """``(out, in/groups, kernel)``: the weight's shape, kernel () for a Linear."""
        w = self.module.weight
        return w.shape[0], w.shape[1], tuple(w.shape[2:])

    def fail(self, what: str) -> LycorisFormatError:
        return LycorisFormatError(f"{self.where}: {self.lora_name}: {what}")

    def need(self, algo: str, *suffixes: str) -> None:
        missing = [s for s in suffixes if s not in self.parts]
        if missing:
            raise self.fail(f"is a {algo} entry without {', '.join(missing)}")

    def expect(self, suffix: str, shape: tuple[int, ...], why: str) -> Tensor:
        """The entry's ``suffix`` tensor, which must have ``shape`` (else an error naming key, shapes and layer)."""
        t = self.parts[suffix]
        if tuple(t.shape) != tuple(shape):
            out, in_g, k = self.dims
            what = f"nn.Linear({in_g}, {out})" if not k else \
                f"a Conv2d of {in_g} input channels per group, {out} outputs, kernel {k}"
            raise LycorisFormatError(f"{self.where}: {self.lora_name}.{suffix} has shape {tuple(t.shape)}, but the "
                                     f"model's {self.path} ({what}) {why} needs {tuple(shape)}")
        return t

    def rank(self, suffix: str, dim: int) -> int:
        t = self.parts[suffix]
        if t.dim() <= dim or t.shape[dim] < 1:
            raise self.fail(f"{suffix} has shape {tuple(t.shape)}, which gives no rank")
        return int(t.shape[dim])

    def alpha(self, rank: int) -> float:
        """The entry's alpha; missing or 0: the rank (scale 1), as LyCORIS and kohya read it."""
        t = self.parts.get("alpha")
        if t is None:
            return float(rank)
        if t.numel() != 1 or t.dtype == torch.bool:
            raise self.fail(f"alpha has shape {tuple(t.shape)}; it must be one number")
        alpha = float(t.reshape(()).double())
        if alpha == 0:
            return float(rank)
        if not math.isfinite(alpha) or alpha < 0:
            raise self.fail(f"alpha is {alpha}; peftlite reads a positive finite alpha (or 0, meaning the rank)")
        return alpha


# ---- reading: (AdapterSpec, peftlite's factors) ------------------------------------------------------

def read_lora(e: Entry) -> tuple[AdapterSpec, dict[str, Tensor]]:
    """LoRA / LoCon: A = lora_down (flat) or, with a Tucker core, mid ×₂ down; B = lora_up."""
    e.need("lora", "lora_down.weight", "lora_up.weight")
    out, in_g, k = e.dims
    r = e.rank("lora_down.weight", 0)
    at, ones = f"at rank {r} (lora_down's rows)", (1,) * len(k)
    up = e.expect("lora_up.weight", (out, r, *ones), at)
    if "lora_mid.weight" not in e.parts:
        a = e.expect("lora_down.weight", (r, in_g, *k), at).reshape(r, -1)  # (r, in/g·kh·kw)
    elif not k:
        raise e.fail("has lora_mid.weight (LoCon's Tucker core), but the model's layer is a Linear")
    else:
        down = e.expect("lora_down.weight", (r, in_g, *ones), f"{at}, with a Tucker core,")
        a = tucker_in(e.expect("lora_mid.weight", (r, r, *k), at), down.reshape(r, in_g))
    return AdapterSpec(rank=r, alpha=e.alpha(r)), {"A": a, "B": up.reshape(out, r)}


def read_loha(e: Entry) -> tuple[AdapterSpec, dict[str, Tensor]]:
    """LoHa: A_i = hada_wi_b, B_i = hada_wi_a; with Tucker cores A_i = t_i ×₂ hada_wi_b, B_i = hada_wi_aᵀ."""
    e.need("loha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    out, in_g, k = e.dims
    r = e.rank("hada_w1_b", 0)
    at = f"at rank {r} (hada_w1_b's rows)"
    tucker = [s for s in ("hada_t1", "hada_t2") if s in e.parts]
    if tucker and (len(tucker) < 2 or not k):
        raise e.fail(f"has {' and '.join(tucker)} (LoHa's Tucker cores): both are needed, on a Conv2d layer")
    factors = {}
    for i in ("1", "2"):
        if tucker:
            core = e.expect(f"hada_t{i}", (r, r, *k), at)
            w_a = e.expect(f"hada_w{i}_a", (r, out), f"{at}, Tucker form,")
            w_b = e.expect(f"hada_w{i}_b", (r, in_g), f"{at}, Tucker form,")
            factors[f"A{i}"], factors[f"B{i}"] = tucker_in(core, w_b), w_a.t()
        else:
            factors[f"B{i}"] = e.expect(f"hada_w{i}_a", (out, r), at)
            factors[f"A{i}"] = e.expect(f"hada_w{i}_b", (r, in_g * math.prod(k)), at)
    return AdapterSpec(rank=r, alpha=e.alpha(r), kind="loha"), factors


def _lokr_halves(e: Entry) -> tuple[bool, bool]:
    """Whether W1 and W2 are full (``lokr_w1``) or low-rank (``lokr_w1_a`` and ``_b``); anything else raises."""
    for i in ("1", "2"):
        full, pair = f"lokr_w{i}", (f"lokr_w{i}_a", f"lokr_w{i}_b")
        given = [s for s in (full, *pair) if s in e.parts]
        if given not in ([full], list(pair)):
            raise e.fail(f"has {', '.join(given) or 'nothing'} for LoKr's W{i}: it needs {full}, or both of "
                         f"{' and '.join(pair)}")
    return "lokr_w1" in e.parts, "lokr_w2" in e.parts


def read_lokr(e: Entry) -> tuple[AdapterSpec, dict[str, Tensor]]:
    """LoKr: W1 = lokr_w1 or B1, A1 = lokr_w1_a, lokr_w1_b; W2 = lokr_w2 (flat) or B2, A2 = lokr_w2_a, lokr_w2_b
    (flat), with a Tucker core A2 = t2 ×₂ lokr_w2_b, B2 = lokr_w2_aᵀ. The split comes from W1's shape."""
    if "lokr" not in _spec.KINDS:
        raise e.fail("is a LoKr entry (lokr_w1...), and this peftlite has no LoKr adapters")
    out, in_g, k = e.dims
    w1_full, w2_full = _lokr_halves(e)
    tucker = "lokr_t2" in e.parts
    if tucker and (w2_full or not k):
        raise e.fail("has lokr_t2 (a Tucker W2), which needs a low-rank W2 (lokr_w2_a, lokr_w2_b) on a Conv2d")
    w1 = [e.parts[s] for s in (("lokr_w1",) if w1_full else ("lokr_w1_a", "lokr_w1_b"))]
    if any(t.dim() != 2 or 0 in t.shape for t in w1):
        raise e.fail(f"W1 has shapes {', '.join(str(tuple(t.shape)) for t in w1)}; LoKr's W1 (or its factors) "
                     "are matrices")
    out_l, in_m = w1[0].shape[0], w1[-1].shape[1]
    if out % out_l or in_g % in_m:
        raise e.fail(f"W1 of shape ({out_l}, {in_m}) does not split the model's {e.path} ({out} outputs, {in_g} input "
                     "channels per group): out_l must divide the one, in_m the other")
    out_k, in_n, kernel = out // out_l, in_g // in_m, math.prod(k)
    # LyCORIS's rank: lokr_w1_a's columns, else lokr_w2_a's (its rows in the Tucker form); none when both are full
    r = e.rank("lokr_w1_a", 1) if not w1_full else e.rank("lokr_w2_a", 0 if tucker else 1) if not w2_full else 1
    at = f"with W1 ({out_l}, {in_m}) at rank {r}"
    t: dict[str, Tensor] = {}
    if w1_full:
        t["W1"] = w1[0]
    else:
        t["B1"], t["A1"] = e.expect("lokr_w1_a", (out_l, r), at), e.expect("lokr_w1_b", (r, in_m), at)
    flat = (out_k, in_n * kernel)
    if w2_full:  # (out_k, in_n, kh, kw) as LyCORIS writes it, or already flat
        w2 = e.parts["lokr_w2"]
        t["W2"] = (w2 if tuple(w2.shape) == flat else e.expect("lokr_w2", (out_k, in_n, *k), at)).reshape(flat)
    elif tucker:
        core = e.expect("lokr_t2", (r, r, *k), at)
        t["B2"] = e.expect("lokr_w2_a", (r, out_k), f"{at}, Tucker form,").t()
        t["A2"] = tucker_in(core, e.expect("lokr_w2_b", (r, in_n), f"{at}, Tucker form,"))
    else:  # lokr_w2_b (r, in_n·kh·kw) as LyCORIS keeps it, or (r, in_n, kh, kw)
        w2_b = e.parts["lokr_w2_b"]
        t["B2"] = e.expect("lokr_w2_a", (out_k, r), at)
        t["A2"] = (w2_b if tuple(w2_b.shape) == (r, flat[1]) else e.expect("lokr_w2_b", (r, in_n, *k), at)) \
            .reshape(r, -1)
    alpha = float(r) if w1_full and w2_full else e.alpha(r)  # both full: scale 1, whatever the file's alpha
    return AdapterSpec(rank=r, alpha=alpha, kind="lokr", kron=(out_l, in_m), full=(w1_full, w2_full)), t


READERS = {"lora": read_lora, "loha": read_loha, "lokr": read_lokr}


# ---- writing: the entry's suffixes, alpha included ---------------------------------------------------

def _alpha(value: float) -> Tensor:
    return torch.tensor(float(value), dtype=torch.float32)  # 0-d, as LyCORIS stores it


def write_lora(entry: dict, t: dict[str, Tensor], spec: AdapterSpec) -> dict[str, Tensor]:
    a, b = t["A"], t["B"]
    if entry["kind"] == "conv2d":
        a = a.reshape(spec.rank, entry["in_channels"] // entry["groups"], *entry["kernel_size"])  # (r, in/g, kh, kw)
        b = b.reshape(b.shape[0], spec.rank, 1, 1)  # (out, r, 1, 1)
    # scale·r: rsLoRA's alpha / sqrt(r) is written as the alpha that gives it
    return {"lora_down.weight": a, "lora_up.weight": b, "alpha": _alpha(spec.scale * spec.rank)}


def _write_tucker(entry: dict, t: dict[str, Tensor], prefix: str, i: int) -> dict[str, Tensor]:
    """peftlite's Tucker triple ``T<i>`` (r, r, kh·kw), ``D<i>`` (r, in/g), ``B<i>`` (out, r) under LyCORIS's
    names: the core (r, r, kh, kw), ``w<i>_a`` = Bᵀ (r, out) and ``w<i>_b`` = D, as ``read_loha`` reads them."""
    core = t[f"T{i}"]
    return {f"{prefix}_t{i}": core.reshape(*core.shape[:2], *entry["kernel_size"]),
            f"{prefix}_w{i}_a": t[f"B{i}"].t(), f"{prefix}_w{i}_b": t[f"D{i}"]}


def write_loha(entry: dict, t: dict[str, Tensor], spec: AdapterSpec) -> dict[str, Tensor]:
    if "T1" in t:
        return {**_write_tucker(entry, t, "hada", 1), **_write_tucker(entry, t, "hada", 2),
                "alpha": _alpha(spec.scale * spec.rank)}
    return {"hada_w1_a": t["B1"], "hada_w1_b": t["A1"], "hada_w2_a": t["B2"], "hada_w2_b": t["A2"],
            "alpha": _alpha(spec.scale * spec.rank)}


def write_lokr(entry: dict, t: dict[str, Tensor], spec: AdapterSpec) -> dict[str, Tensor]:
    both_full = "W1" in t and "W2" in t  # LyCORIS computes these at scale 1: the scale goes into W1
    out = {"alpha": _alpha(spec.rank if both_full else spec.scale * spec.rank)}
    if "W1" in t:
        out["lokr_w1"] = t["W1"] * spec.scale if both_full else t["W1"]
    else:
        out["lokr_w1_a"], out["lokr_w1_b"] = t["B1"], t["A1"]
    if "W2" in t:
        w2 = t["W2"]
        out["lokr_w2"] = w2.reshape(w2.shape[0], -1, *entry["kernel_size"]) if entry["kind"] == "conv2d" else w2
    elif "T2" in t:
        out.update(_write_tucker(entry, t, "lokr", 2))
    else:
        out["lokr_w2_a"], out["lokr_w2_b"] = t["B2"], t["A2"]  # w2_b flat (r, in_n·kh·kw), as LyCORIS keeps it
    return out


WRITERS = {"lora": write_lora, "loha": write_loha, "lokr": write_lokr}
