"""One adapter's hyper-parameters: their one validation, their one scale formula, their file entry fields.

``AdapterSpec`` is what ``wrap`` validates its arguments into, what ``registry.attach`` builds pairs from,
what a file's layer entry is read into (``from_entry``) and written from (``entry``), and what the CLI
reports. ``scale_of`` is the only place the scale is computed (``LowRank.scale`` calls it on every
forward, so it is a plain function of numbers). ``is_positive`` is the one "positive finite number"
predicate of the package.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

KINDS = ("lora", "loha", "lokr")  # adapter kinds: the math in functional.py, the pair classes in layers/
VARIANTS = ("lora", "dora")
RANK_SCALINGS = ("linear", "sqrt")
INITS = ("default", "pissa", "olora")  # and "pissa_niter_N" (N >= 1): PiSSA by a randomized SVD (init_niter)


def init_niter(init: str) -> int | None:
    """N of a ``"pissa_niter_N"`` init (PEFT's spelling of PiSSA by ``torch.svd_lowrank``), else None."""
    head, _, n = init.partition("_niter_") if isinstance(init, str) else ("", "", "")
    return int(n) if head == "pissa" and n.isdigit() and int(n) > 0 else None


def is_principal(init: str) -> bool:
    """Does ``init`` start the adapter from the weight's principal part (PiSSA, OLoRA), with a residual base?"""
    return init in ("pissa", "olora") or init_niter(init) is not None


def is_positive(value: object, integral: bool = False) -> bool:
    """A positive finite real (``integral``: a positive int), never a bool; JSON's NaN, Infinity and ints beyond
    a float's range are not."""
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        return False
    try:
        return integral or math.isfinite(value)
    except OverflowError:
        return False


def scale_of(alpha: float, rank: int, rank_scaling: str) -> float:
    """``alpha / rank``, or rsLoRA's ``alpha / sqrt(rank)`` for ``rank_scaling="sqrt"``."""
    return alpha / (math.sqrt(rank) if rank_scaling == "sqrt" else rank)


@dataclass(frozen=True)
class AdapterSpec:
    """Validated on construction (``ValueError`` naming the value and the fix); ``alpha=None`` means the rank.

    ``init``: ``"default"`` (A Kaiming-uniform, B zero), ``"pissa"``, ``"pissa_niter_N"`` or ``"olora"``
    (layers/principal.py: the adapter starts from the weight's principal part, and the base holds the rest).

    LoKr's own fields (``kind="lokr"``, layers/lokr.py): ``decompose_factor`` and ``decompose_both`` choose the split as
    PEFT's LoKrConfig fields of those names do when wrapping; ``kron`` = (out_l, in_m) and ``full``
    = (W1 full, W2 full) fix one layer's split, as a file's layer entry records it.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    variant: str = "lora"
    rank_scaling: str = "linear"
    kind: str = "lora"
    init: str = "default"
    decompose_factor: int = -1
    decompose_both: bool = False
    kron: tuple[int, int] | None = None
    full: tuple[bool, bool] | None = None
    tucker: bool = False  # LoHa's / LoKr's Tucker form on kh×kw convs (PEFT's use_effective_conv2d)

    def __post_init__(self) -> None:
        if not is_positive(self.rank, integral=True):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}; typical values are 4 to 64")
        alpha = self.rank if self.alpha is None else self.alpha
        if not is_positive(alpha):
            raise ValueError(f"alpha must be a positive finite number (scale = alpha / rank), got {alpha!r}; "
                             "leave it None for alpha = rank")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        for field, known in (("kind", KINDS), ("variant", VARIANTS)):
            if getattr(self, field) not in known:
                raise ValueError(f"{field} must be one of {', '.join(map(repr, known))}, "
                                 f"got {getattr(self, field)!r}")
        if not (self.init in INITS or is_principal(self.init)):
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))} or 'pissa_niter_N' (N a positive "
                             f"integer: PiSSA by a randomized SVD), got {self.init!r}")
        if is_principal(self.init) and (self.kind, self.variant) != ("lora", "lora"):
            raise ValueError(f"init={self.init!r} is defined for plain LoRA only, got kind={self.kind!r}, "
                             f"variant={self.variant!r}; use kind='lora', variant='lora' with it, or init='default'")
        if self.kind != "lora" and self.variant != "lora":
            raise ValueError(f"variant={self.variant!r} is defined for kind='lora' only, got kind={self.kind!r}; "
                             "use variant='lora' with it")
        if self.rank_scaling not in RANK_SCALINGS:
            raise ValueError(f"rank_scaling must be 'linear' (scale = alpha / rank) or 'sqrt' (rsLoRA: alpha / "
                             f"sqrt(rank)), got {self.rank_scaling!r}")
        self._check_lokr()
        if not isinstance(self.tucker, bool) or (self.tucker and self.kind not in ("loha", "lokr")):
            raise ValueError(f"tucker={self.tucker!r}: the Tucker form (PEFT's use_effective_conv2d, LyCORIS's "
                             "use_tucker) is True or False, and True needs kind='loha' or 'lokr', got "
                             f"kind={self.kind!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    def _check_lokr(self) -> None:
        lokr = {"decompose_factor": -1, "decompose_both": False, "kron": None, "full": None}
        if self.kind != "lokr":
            given = [f for f, default in lokr.items() if getattr(self, f) != default]
            if given:
                raise ValueError(f"{given[0]}={getattr(self, given[0])!r} is a LoKr field; it needs kind='lokr', "
                                 f"got kind={self.kind!r}")
            return
        if self.decompose_factor != -1 and not is_positive(self.decompose_factor, integral=True):
            raise ValueError(f"decompose_factor must be -1 (split near the square root) or a positive integer, got "
                             f"{self.decompose_factor!r}")
        if not isinstance(self.decompose_both, bool):
            raise ValueError(f"decompose_both must be True or False, got {self.decompose_both!r}")
        if self.kron is not None:
            kron = tuple(self.kron) if isinstance(self.kron, (list, tuple)) else ()
            if len(kron) != 2 or not all(is_positive(k, integral=True) for k in kron):
                raise ValueError(f"kron must be two positive integers (out_l, in_m), got {self.kron!r}")
            object.__setattr__(self, "kron", tuple(int(k) for k in kron))
        if self.full is not None:
            full = tuple(self.full) if isinstance(self.full, (list, tuple)) else ()
            if len(full) != 2 or not all(isinstance(f, bool) for f in full):
                raise ValueError(f"full must be two booleans (W1 full, W2 full), got {self.full!r}")
            object.__setattr__(self, "full", full)

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank, self.rank_scaling)

    def replace(self, **changes: Any) -> AdapterSpec:
        return dataclasses.replace(self, **changes)

    def entry(self) -> dict[str, Any]:
        """The fields of a file's layer entry: rank, alpha, dropout, and variant / rank_scaling when not the
        defaults (files without them stay readable by older peftlite)."""
        out: dict[str, Any] = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout}
        if self.kind != "lora":
            out["adapter_kind"] = self.kind  # "kind" names the layer type in an entry
        if self.variant != "lora":
            out["variant"] = self.variant
        if self.rank_scaling != "linear":
            out["rank_scaling"] = self.rank_scaling
        if self.decompose_factor != -1:
            out["decompose_factor"] = self.decompose_factor
        if self.decompose_both:
            out["decompose_both"] = True
        if self.kron is not None:
            out["kron"] = list(self.kron)
        if self.full is not None:
            out["full"] = list(self.full)
        if self.tucker:
            out["tucker"] = True
        return out

    @classmethod
    def from_entry(cls, entry: dict[str, Any], where: str = "layer entry") -> AdapterSpec:
        """A file's layer entry read back; ``ValueError`` names ``where`` and the bad field."""
        if entry.get("alpha") is None:
            raise ValueError(f"{where}: no alpha; a file's layer entry gives the alpha its values were trained at")
        try:
            return cls(rank=entry.get("rank"), alpha=entry.get("alpha"), dropout=entry.get("dropout", 0.0),
                       variant=entry.get("variant", "lora"), rank_scaling=entry.get("rank_scaling", "linear"),
                       kind=entry.get("adapter_kind", "lora"), decompose_factor=entry.get("decompose_factor", -1),
                       decompose_both=entry.get("decompose_both", False), kron=entry.get("kron"),
                       full=entry.get("full"), tucker=entry.get("tucker", False))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
