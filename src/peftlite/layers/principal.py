"""Principal-component initialisations (PiSSA, OLoRA): the adapter starts from the weight's principal part,
and the base weight holds the rest, written and taken back through the exact merge kernels.

    W  ->  W_res = W - scale·B0 @ A0      (kernels.merge_ with -scale: a MergeRecord makes it undoable)
    the adapter starts at (A, B) = (A0, B0), so W_res + scale·B A = W at init, to rounding

B0 A0 is PiSSA's ``U_r S_r V_rᵀ / scale`` or OLoRA's ``Q[:, :r] R[:r]`` (``functional.pissa_pair``,
``olora_pair``) of the weight as one (out, fan_in) matrix: a conv kernel of any geometry as A reads it. The
owner adapter's pairs keep ``A0`` and ``B0`` as persistent buffers, and the layer's ``Residual`` the records,
so the original W comes back bit for bit (``restore``: ``peftlite.restore_base``, ``delete``,
``unwrap(merge=False)``). Whenever the owner is not fully active (disabled, ``use(None)``, another adapter,
a ``per_sample`` row of another adapter), the layer adds the frozen ``(1 - w_owner)·scale·B0 A0`` term
(``AdaptedLayer.residual_term``), so the model computes on the original weights.

Everything here is all or nothing: ``plan`` computes every factor and checks every layer before anything
is written; ``write`` puts back the weights it wrote if one fails.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import functional, kernels
from .base import AdaptedLayer, Residual
from .registry import Kind, _overlaps, _span
from .spec import AdapterSpec, init_niter, scale_of


@dataclass
class Start:
    """One weight's principal init: the factors, and the scale the residual is written with."""

    layer: str
    module: nn.Module
    slot: str
    A0: Tensor  # (r, fan_in), fp32 or wider, on the weight's device
    B0: Tensor  # (out, r)
    scale: float


def _tied(model: nn.Module, name: str, module: nn.Module, slot: str, w: Tensor) -> str | None:
    """Another tensor of ``model`` that is ``w`` or overlaps its storage (a tied weight), or None."""
    span = _span(w)
    for owner, m in model.named_modules(remove_duplicate=False):
        for tname, t in (*m._parameters.items(), *m._buffers.items()):
            if t is None or (m is module and tname == slot):
                continue
            if t is w or _overlaps(_span(t), span):
                return f"{owner}.{tname}" if owner else tname
    return None


@torch.no_grad()
def plan(model: nn.Module, layers: list[tuple[str, nn.Module]], kinds: list[Kind], spec: AdapterSpec,
         adapter: str) -> list[Start]:
    """Every weight's factors for ``spec.init``, computed and checked before anything is written.

    Raises:
        ValueError: naming the layer and the fix, for a layer whose base already holds a principal init's
            residual, a weight on the meta device, a rank above min(out, fan_in), non-finite weights (or
            factors), a tied weight, or a weight with no in-place matrix view. Nothing is changed.
    """
    niter = init_niter(spec.init)
    starts = []
    for (name, module), kind in zip(layers, kinds, strict=True):
        held = module.adapter_state.residual if isinstance(module, AdaptedLayer) else None
        if held is not None:
            raise ValueError(
                f"wrap(init={spec.init!r}): {name}'s base already holds the residual of adapter {held.owner!r}'s "
                f"{held.init} init, and a second principal-component init would decompose that residual; wrap "
                f"{adapter!r} with init='default', leave {name} out of targets, or peftlite.delete({held.owner!r}) "
                "first")
        dora = [a for a, pairs in module.adapters().items() if any(p.variant == "dora" for p in pairs.values())] \
            if isinstance(module, AdaptedLayer) else []
        if dora:
            raise ValueError(f"wrap(init={spec.init!r}): {name} has the DoRA adapter {dora[0]!r}, whose magnitude "
                             "rescales one weight, and a residual base plus its frozen principal term is not one; "
                             f"leave {name} out of targets, or peftlite.delete({dora[0]!r}) first")
        for slot in kind.slots(module):
            w = module._parameters[slot]
            where = f"wrap(init={spec.init!r}): {name}" + ("" if slot == "weight" else f".{slot}")
            if w.is_meta:
                raise ValueError(f"{where} is on the meta device and holds no values, so there is nothing to "
                                 "decompose; load the pretrained weights first (model.to_empty(device=...), then "
                                 "load_state_dict), then wrap")
            out, fan_in = w.shape[0], w[0].numel()
            if spec.rank > min(out, fan_in):
                raise ValueError(f"{where}: rank {spec.rank} is above min(out, fan_in) = min({out}, {fan_in}) of its "
                                 f"weight {tuple(w.shape)}; lower rank to at most {min(out, fan_in)}, or leave "
                                 "the layer out of targets")
            other = _tied(model, name, module, slot, w)
            if other is not None:
                raise ValueError(f"{where}: its weight is shared with {other} (tied weights), and the residual is "
                                 f"written in place, which would change {other} too; leave the layer out of "
                                 "targets, or untie the weights first")
            W = w.detach().reshape(out, fan_in).to(torch.promote_types(w.dtype, torch.float32))
            if not bool(torch.isfinite(W).all()):
                bad = W.numel() - int(torch.isfinite(W).sum())
                raise ValueError(f"{where}: its weight holds {bad} non-finite values, which have no principal "
                                 "components; repair the checkpoint, or wrap with init='default'")
            if spec.init == "olora":
                A0, B0 = functional.olora_pair(W, spec.rank)
            else:
                A0, B0 = functional.pissa_pair(W, spec.rank, spec.scale, niter)
            if not (bool(torch.isfinite(A0).all()) and bool(torch.isfinite(B0).all())):
                raise ValueError(f"{where}: the {spec.init} decomposition gave non-finite factors; wrap with "
                                 "init='default', or a smaller rank")
            kernels.as_matrix(w.data, A0, B0)  # raises (ValueError) for a weight with no in-place view
            starts.append(Start(name, module, slot, A0, B0, spec.scale))
    return starts


def refuse_dora(layers: list[tuple[str, nn.Module]], spec: AdapterSpec, adapter: str) -> None:
    """Raise ValueError for a DoRA adapter on a layer whose base holds a residual: DoRA rescales the rows of the
    weight it adapts, and the residual base plus the frozen principal term is not one weight it can rescale."""
    if spec.variant != "dora":
        return
    for name, module in layers:
        held = module.adapter_state.residual if isinstance(module, AdaptedLayer) else None
        if held is not None:
            raise ValueError(f"wrap(variant='dora'): {name}'s base holds the residual of adapter {held.owner!r}'s "
                             f"{held.init} init, which a DoRA magnitude cannot rescale; call "
                             f"peftlite.restore_base(model) first, or wrap {adapter!r} as plain LoRA")


@torch.no_grad()
def write(starts: list[Start]) -> list[kernels.MergeRecord]:
    """``W -= scale·B0 A0`` in place through the exact merge kernels, one record per weight; all or nothing.

    Raises:
        ValueError: a residual that would not be finite in the weight's dtype (every weight written is put
            back bit-exactly first).
    """
    records: list[kernels.MergeRecord] = []
    try:
        for s in starts:
            w2, a2, b2 = kernels.as_matrix(s.module._parameters[s.slot].data, s.A0, s.B0)
            records.append(kernels.merge_(w2, a2, b2, -s.scale))
    except BaseException as e:
        for s, record in reversed(list(zip(starts, records))):
            w2, a2, b2 = kernels.as_matrix(s.module._parameters[s.slot].data, s.A0, s.B0)
            kernels.unmerge_(w2, a2, b2, -s.scale, record)
        if isinstance(e, kernels.NonFiniteMergeError):
            failed = starts[len(records)]
            raise ValueError(f"wrap: the residual of {failed.layer} would not be finite in its dtype ({e}); every "
                             "weight is as it was. Wrap with init='default'") from None
        raise
    return records


@torch.no_grad()
def install(starts: list[Start], records: list[kernels.MergeRecord], adapter: str, init: str) -> None:
    """The attached pairs of ``adapter`` start at (A0, B0), keep them as buffers, and the layers their residuals."""
    for s, record in zip(starts, records, strict=True):
        pair = s.module.pairs(adapter)[s.slot]
        pair.A.copy_(s.A0)
        pair.B.copy_(s.B0)
        pair.register_buffer("A0", s.A0.to(pair.A.dtype).clone())
        pair.register_buffer("B0", s.B0.to(pair.B.dtype).clone())
        state = s.module.adapter_state
        if state.residual is None:
            state.residual = Residual(adapter, {}, init=init)
        state.residual.scales[s.slot] = s.scale
        state.residual.records[s.slot] = record
        state.residual.digests[s.slot] = digest(s.module._parameters[s.slot])


def digest(weight: Tensor) -> str:
    """A digest of the weight's bits (in its logical order), to tell whether a record still describes it."""
    raw = weight.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()


def check_restorable(layers: list[tuple[str, AdaptedLayer]], what: str) -> None:
    """Raise RuntimeError, before anything is written, if a residual's weight moved device or dtype since it was
    written (its record no longer describes it)."""
    for name, layer in layers:
        residual = layer.adapter_state.residual
        for slot, record in ({} if residual is None else residual.records).items():
            w = layer._parameters[slot]
            if w.dtype != record.dtype or w.device != record.device:
                raise RuntimeError(f"{what}: {name}'s residual base was written as {record.dtype} on {record.device}, "
                                   f"but {slot!r} is now {w.dtype} on {w.device}; the model is unchanged. Move it "
                                   "back to restore the original weights exactly")


@torch.no_grad()
def restore(layer: AdaptedLayer, name: str, plain: bool = False) -> None:
    """Give ``layer`` its original weights back (bit-exact with the records).

    With ``plain``, the owner's pairs become the plain rank-2r LoRA on the original weights (``shared_pair``:
    new parameters, so rebuild the optimizer), so that the layer computes what it did; else they keep their
    values and their ``A0``/``B0`` buffers (the caller drops the adapter or the layer's adapters).
    """
    residual = layer.adapter_state.residual
    if residual is None:
        return
    pairs = layer.pairs(residual.owner)
    shared = {slot: shared_pair(pairs[slot], scale) for slot, scale in residual.scales.items()} if plain else {}
    for slot, scale in residual.scales.items():
        record = residual.records.get(slot)
        w = layer._parameters[slot]
        if record is not None and (w.dtype, w.device) == (record.dtype, record.device) \
                and residual.digests.get(slot) != digest(w):
            record = None  # the weight changed since (another state_dict loaded): the record is not its
        if record is None:
            warnings.warn(f"{name}: its residual weight is not the one written at wrap (a state_dict was loaded "
                          "into it), so the original weights are recomputed as W_res + scale·B0 A0 and may differ "
                          "in the last bit", stacklevel=3)
        w2, a2, b2 = kernels.as_matrix(layer._parameters[slot].data, pairs[slot].A0, pairs[slot].B0)
        kernels.unmerge_(w2, a2, b2, -scale, record)
    for slot, (A2, B2, rank, alpha) in shared.items():
        pair = pairs[slot]
        pair.A = nn.Parameter(A2, requires_grad=pair.A.requires_grad)
        pair.B = nn.Parameter(B2, requires_grad=pair.B.requires_grad)
        pair.rank, pair.alpha = rank, alpha
        del pair._buffers["A0"], pair._buffers["B0"]
    layer.adapter_state.residual = None


def shared_pair(pair, residual_scale: float) -> tuple[Tensor, Tensor, int, float]:
    """The owner's pair as a plain LoRA on the original weights: ``(A', B', rank 2r, alpha')`` with the scale kept
    (alpha × 2, × √2 under rsLoRA, as PEFT's conversion), so ``scale·B' A' = scale·B A - residual_scale·B0 A0``."""
    A, B = pair.A.detach(), pair.B.detach()
    B0 = pair.B0 * (residual_scale / pair.scale) if residual_scale != pair.scale else pair.B0
    A2, B2 = functional.shared_pair(A, B, pair.A0, B0)
    rank = A2.shape[0]  # 2r (a pair padded for hot-swapping: its padded rank + r)
    return A2.contiguous(), B2.contiguous(), rank, pair.scale / scale_of(1.0, rank, pair.rank_scaling)


def refuse_owner(layers: list[tuple[str, AdaptedLayer]], adapters, what: str, fix: str) -> None:
    """Raise ValueError if one of ``adapters`` started from a principal init: its values are relative to a
    residual base, not to the original weights that files and combinations speak of."""
    for name, layer in layers:
        residual = layer.adapter_state.residual
        if residual is not None and residual.owner in adapters:
            raise ValueError(f"{what}: adapter {residual.owner!r} started from a {residual.init} init, so its "
                             f"values are relative to the residual base of {name} (and others), not to the original "
                             f"weights; {fix}")


def shared_tensors(layers: list[tuple[str, AdaptedLayer]], adapter: str, tensors: dict, config: dict
                   ) -> tuple[dict, dict]:
    """A file's ``(tensors, config)`` with each layer where ``adapter`` owns a residual written as the plain LoRA
    of rank 2r on the ORIGINAL weights (``shared_pair``); its entry says which init produced it."""
    tensors, layers_cfg = dict(tensors), {k: dict(v) for k, v in config["layers"].items()}
    inits = set()
    for name, layer in layers:
        residual = layer.adapter_state.residual
        if residual is None or residual.owner != adapter or name not in layers_cfg:
            continue
        prefix = f"{name}.lora.{adapter}" if name else f"lora.{adapter}"
        single = list(layer.pairs(adapter)) == ["weight"] and not isinstance(layer.lora[adapter], nn.ModuleDict)
        for slot, pair in layer.pairs(adapter).items():
            A2, B2, rank, alpha = shared_pair(pair, residual.scales[slot])
            base = prefix if single else f"{prefix}.{slot}"
            for part, t in (("A", A2), ("B", B2)):
                if f"{base}.{part}" in tensors:
                    tensors[f"{base}.{part}"] = t
            layers_cfg[name].update(rank=rank, alpha=alpha, init=residual.init)
        inits.add(residual.init)
    config = {**config, "layers": layers_cfg}
    if inits:
        config["init"] = ",".join(sorted(inits))
    return tensors, config
