"""The memory and time of one training step: peftlite LoRA against full fine-tuning, a frozen ∂x step and PEFT.

    PYTHONPATH=src python benchmarks/lean.py [--threads 1] [--repeats 5] [--quick] [--markdown] [--no-rss]
        [--models resnet50,convnext_tiny,vit_b_16,timm_vit,bert]
    PYTHONPATH=src python benchmarks/lean.py --frozen-kinds [--quick]   # single layers, frozen vs trainable
    PYTHONPATH=src python benchmarks/lean.py --floor [--models resnet50]  # the LoRA step's floor (CNNs)

Models (``_lean_models.py``; random init, fp32, ``torch.manual_seed(0)``, no downloads): ResNet-50 and
ConvNeXt-T (batch 8, 128 px, every Conv2d adapted, a new 10-class head), ViT-B/16 (batch 4, 224 px; three
LoRA variants), timm's ViT-B/16 (qkv, proj, fc1, fc2), and a BERT-base-shaped encoder (batch 4, 128
tokens; query/value, and every encoder Linear). Contenders, each a fresh copy of the same initial model:

- ``full``: everything trains, BatchNorm in train mode;
- ``frozen_dx``: every parameter frozen, BatchNorm in eval mode, the gradient flowing to the input: the floor;
- ``lora`` (and the model's other variants): ``peftlite.wrap(rank=8, alpha=8)``, adapters randomised;
- ``lora_dropout``: the first variant with ``dropout=0.1``;
- ``peft``: HF PEFT's ``LoraConfig(r=8, lora_alpha=8)`` on the layers the first variant adapts, the head in
  ``modules_to_save`` ("cannot build" and the error's first line where PEFT refuses); BatchNorm as PEFT
  leaves it (train mode, statistics updating), where peftlite's ``wrap`` freezes the statistics;
- ``lora_bf16``, ``full_bf16``: the same steps under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
- ``lora_ckpt``: the first variant after ``peftlite.checkpointing(model)``;
- ``lora_activations`` (the CNNs): the first variant with every conv's adapter on the activations path
  (depthwise ones stay dense), which dropout forces: the floor of ``lora_dropout`` without its masks.

A step is forward, cross-entropy loss against random labels, backward, SGD (lr 1e-3) on the trainable
parameters and ``zero_grad(set_to_none=True)``. A note under a table names any contender whose trainable
parameters get no gradient in the warm-up step (an adapter its forward bypasses). Columns:

- saved: the bytes autograd saves for backward (``saved_bytes``): every tensor the
  ``saved_tensors_hooks`` pack hook sees in forward + loss and that is still held when the loss is, each
  storage once, parameters and buffers left out (the input is counted where an op saves it);
- live: the growth of the C heap (glibc ``mallinfo2``: in-use plus mmapped bytes) from just before the
  forward to just after the loss, grads None and ``gc.collect()`` first (``live_bytes``). It sees what the
  hook cannot: tensors kept as attributes of an autograd Function's ctx or in closures (torch's
  non-reentrant checkpoint keeps its inputs as saved tensors, so the hook does see those). Where saved and
  live differ by more than a few %, something is kept outside ``save_for_backward``;
- peak RSS: the step in a fresh process (``--one``), after a warm-up step and ``malloc_trim``: VmHWM
  growth over VmRSS, after writing 5 to /proc/self/clear_refs (as ``common.PEAK_SCRIPT``);
- time: the median step, all contenders of a model round-robin in one process (``common.timed``, one call a
  round), and each ratio as the median of the round-by-round ratios with their min–max.

``--frozen-kinds`` times instead, interleaved, forward + backward of single layers with the gradient
flowing to the input, every weight frozen against every weight trainable: Linear(768, 3072) on 2-D,
contiguous 3-D, and non-contiguous 3-D input (a (T, B, 768) view of a (B, T, 768) tensor, which is what
``nn.MultiheadAttention(batch_first=True)`` hands its in-projection; stock and as ``wrap`` freezes it, a
``LeanLinear``), Conv2d 3x3, BatchNorm2d (eval),
LayerNorm, self-attention ``nn.MultiheadAttention``, and that attention after ``wrap(targets=nn.Linear)``
(its out_proj adapted and training, the rest frozen) against the plain trainable one.

``--floor`` (the CNNs) measures what an exact LoRA step cannot avoid: ``adapters_off_dx`` is the wrapped model
under ``peftlite.disabled`` with the gradient flowing to the input (peftlite's frozen BatchNorm, no adapter
work), timed interleaved with ``frozen_dx`` and ``lora``; "adapter products" is the sum over the adapted
convs, at the step's shapes, of the four r-wide products any exact backward of a LoRA conv runs (``h =
conv(x, A)`` for ∂B, ``Bᵀ g``, ∂B, ∂A: ``conv_autograd``'s own helpers), each timed alone (median of 9).
The floor is ``adapters_off_dx`` + the adapter products; the stem's ∂x, which the LoRA step skips (its
input needs no gradient), stays in both frozen steps, so the floor is an upper bound on the true minimum.

The first line gives the date and the command, the last the machine (``common.machine()``, whose load
average is the one at the end). ``--quick`` keeps the architectures but shrinks images to 32 px and
sequences to 16 tokens, with 2 rounds: a smoke run, not figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import os
import statistics
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _lean_models  # noqa: E402
import common  # noqa: E402

import peftlite  # noqa: E402
from peftlite.layers import conv  # noqa: E402
from peftlite.wrapping import resolve_targets  # noqa: E402

RANK = 8
LR = 1e-3
MiB = 2**20


# ---- measurements: importable, each takes ``forward``, a callable that runs forward + loss and returns the loss

def _storage(t: Tensor) -> tuple[int, int]:
    """(key, bytes) of a tensor's storage; opaque tensors (no storage) are keyed by identity."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


def held_storages(modules: Iterable[nn.Module]) -> set[int]:
    """Storage keys of every parameter and buffer of ``modules``: tensors that exist without a step."""
    return {_storage(t)[0] for m in modules for t in (*m.parameters(), *m.buffers())}


def saved_bytes(forward: Callable[[], Tensor], model: nn.Module) -> int:
    """Bytes autograd saves for backward in ``forward()``: distinct storages the pack hook sees that are
    still held once the forward is done, parameters and buffers of ``model`` left out."""
    held = held_storages([model])
    seen: dict[int, tuple[int, list]] = {}

    def pack(t: Tensor) -> Tensor:
        key, n = _storage(t)
        seen.setdefault(key, (n, []))[1].append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    # a tensor saved by a branch that led nowhere is freed already: only what the graph still holds counts
    total = sum(n for key, (n, refs) in seen.items() if key not in held and any(r() is not None for r in refs))
    del loss
    return total


class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class _MallInfo(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int) for f, _ in _MallInfo2._fields_]


def _mallinfo() -> Callable[[], int] | None:
    """glibc's heap figure, in-use plus mmapped bytes (``uordblks + hblkhd``); None off glibc."""
    libc = ctypes.CDLL(None)
    for name, struct in (("mallinfo2", _MallInfo2), ("mallinfo", _MallInfo)):  # mallinfo: glibc < 2.33
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.restype = struct

            def read(fn=fn) -> int:
                info = fn()
                return info.uordblks + info.hblkhd
            return read
    return None


heap_bytes = _mallinfo()


def live_bytes(forward: Callable[[], Tensor], model: nn.Module) -> int | None:
    """Growth of the C heap across ``forward()`` (forward + loss, before backward), grads None and
    ``gc.collect()`` first: everything the step holds for backward, however it is held. None off glibc."""
    if heap_bytes is None:
        return None
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = heap_bytes()
    loss = forward()
    grown = heap_bytes() - before
    del loss
    return grown


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_rss_bytes(step: Callable[[], None]) -> int:
    """Peak RSS growth of one ``step()`` (after a warm-up step and ``malloc_trim``): VmHWM − VmRSS before."""
    step()
    gc.collect()
    getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss("VmRSS:")
    step()
    return rss("VmHWM:") - before


def rounds(fns: dict[str, Callable[[], None]], repeats: int) -> list[dict[str, float]]:
    """Seconds per call of each fn, round by round, interleaved (``common.timed`` with one call a round)."""
    return [common.timed(fns, 1, warmup=1 if i == 0 else 0) for i in range(repeats)]


def ratio(per_round: list[dict[str, float]], num: str, den: str) -> str:
    """``median [min–max]`` of the round-by-round ratios num / den."""
    if not per_round or den not in per_round[0] or num not in per_round[0]:
        return "n/a"
    r = [t[num] / t[den] for t in per_round]
    return f"{statistics.median(r):.2f} [{min(r):.2f}–{max(r):.2f}]"


# ---- contenders --------------------------------------------------------------------------------------------

@dataclass
class Contender:
    """One way to train the model: ``forward`` runs forward + loss; ``step`` a whole training step."""

    model: nn.Module
    forward: Callable[[], Tensor]
    optimizer: torch.optim.Optimizer | None  # None when nothing trains (frozen_dx)

    def step(self) -> None:
        self.forward().backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)

    def warm_up(self) -> list[str]:
        """One step (lazy initialisation stays out of the figures); returns the trainable parameters that got
        no gradient: adapters the forward bypasses."""
        self.forward().backward()
        missed = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if self.optimizer is not None:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return missed


def contender_names(case: _lean_models.Case) -> list[str]:
    names = ["full", "frozen_dx", *case.variants, "lora_dropout", "peft", "lora_bf16", "full_bf16", "lora_ckpt"]
    convs_only = case.variants["lora"] is nn.Conv2d
    return names + (["lora_activations"] if convs_only else [])


@contextlib.contextmanager
def _activations_paths():
    """Every conv's adapter on the activations path (``dense`` ones stay dense), as with dropout, where no
    merged weight can serve the base and the adapter at once: ``lora_dropout``'s floor, without the masks."""
    choose = conv.training_path
    conv.training_path = lambda geom, rank, pixels=None: (
        "dense" if choose(geom, rank, pixels) == "dense" else "activations")
    try:
        yield
    finally:
        conv.training_path = choose


def _lora(case: _lean_models.Case, model: nn.Module, targets, dropout: float = 0.0) -> nn.Module:
    model = peftlite.wrap(model, targets=targets, rank=RANK, alpha=RANK, dropout=dropout, **case.wrap_kwargs(model))
    common.randomize_adapters(model)
    return model


def _peft(case: _lean_models.Case, model: nn.Module) -> nn.Module:
    if common.peft is None:
        raise RuntimeError("PEFT is not installed (pip install peft)")
    names = [n for n, _ in resolve_targets(model, case.variants["lora"], skip=[case.head])]
    config = common.peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names, lora_dropout=0.0,
                                 modules_to_save=[case.head])
    model = common.peft.get_peft_model(model, config)
    common.randomize_adapters(model)
    return model


def build(case: _lean_models.Case, name: str) -> Contender:
    """The contender ``name`` on a fresh copy of the case's model, in train mode."""
    model = copy.deepcopy(case.model).train()
    first = case.variants["lora"]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if name.endswith("_bf16"):
        context = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if name == "frozen_dx":
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
    elif name in case.variants:
        model = _lora(case, model, case.variants[name])
    elif name in ("lora_bf16", "lora_ckpt", "lora_activations"):
        model = _lora(case, model, first)
    elif name == "lora_dropout":
        model = _lora(case, model, first, dropout=0.1)
    elif name == "peft":
        model = _peft(case, model)
    if name == "lora_ckpt":
        peftlite.checkpointing(model)
    if name == "lora_activations":
        context = _activations_paths
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR) if params else None
    input_grad = name == "frozen_dx"

    def forward() -> Tensor:
        with context():
            return case.loss(model, input_grad)

    return Contender(model, forward, optimizer)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


# ---- one model -------------------------------------------------------------------------------------------

def peak_rss(model_name: str, contender: str, args) -> int | str:
    """Peak RSS growth of one step of the contender, measured in a fresh process (``--one``)."""
    cmd = [sys.executable, __file__, "--one", model_name, contender, "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        return int(proc.stdout.strip().splitlines()[-1])
    except Exception as e:  # no clear_refs, a crash in the child: shown in the table
        return f"n/a ({type(e).__name__})"


def measure(model_name: str, args) -> tuple[_lean_models.Case, list[list[str]]]:
    """Rows of the table for one model."""
    case = _lean_models.CASES[model_name](args.quick)
    built: dict[str, Contender] = {}
    failed: dict[str, str] = {}
    for name in contender_names(case):
        try:
            c = build(case, name)
        except Exception as e:
            failed[name] = f"cannot build: {_first_line(e)}"
            continue
        try:
            missed = c.warm_up()
        except Exception as e:
            failed[name] = f"step failed: {_first_line(e)}"
            continue
        if missed:
            case.notes.append(f"{name}: {len(missed)} trainable tensors get no gradient ({missed[0]}, ...)")
        built[name] = c
    memory = {k: (saved_bytes(c.forward, c.model), live_bytes(c.forward, c.model)) for k, c in built.items()}
    per_round = rounds({k: c.step for k, c in built.items()}, args.repeats)
    peaks = {k: "—" if args.no_rss else peak_rss(model_name, k, args) for k in built}
    mib = lambda v: f"{v / MiB:.1f}" if isinstance(v, int) else str(v)
    full_saved = memory.get("full", (None,))[0]
    rows = []
    for name in contender_names(case):
        if name in failed:
            rows.append([name, failed[name]] + [""] * 6)
            continue
        saved, live = memory[name]
        rows.append([name, mib(saved), f"{saved / full_saved:.2f}" if full_saved else "n/a", mib(live),
                     mib(peaks[name]), f"{1e3 * statistics.median(t[name] for t in per_round):.1f}",
                     ratio(per_round, name, "full"), ratio(per_round, name, "frozen_dx")])
    if "lora_dropout" in built and "lora" in built:  # the dropout goal's ratio, round by round
        case.notes.append(f"lora_dropout ÷ lora, time: {ratio(per_round, 'lora_dropout', 'lora')}")
    case.model = None  # the copies go with ``built``; the caller collects them
    return case, rows


# ---- frozen layer kinds ------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` called as self-attention, in a container that ``peftlite.wrap`` can take."""

    def __init__(self, d: int = 768, heads: int = 12):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        return self.attn(x, x, x, need_weights=False)[0]


def _fwd_bwd(layer: nn.Module, x: Tensor, view: Callable[[Tensor], Tensor] | None) -> Callable[[], None]:
    """Forward + backward of ``layer`` with the gradient flowing to a fresh leaf on ``x``'s storage."""
    with torch.no_grad():
        g = torch.randn_like(layer(view(x) if view else x))

    def go() -> None:
        xi = x.detach().requires_grad_()
        layer(view(xi) if view else xi).backward(g)
        layer.zero_grad(set_to_none=True)
    return go


def frozen_kinds(args) -> list[list[str]]:
    torch.manual_seed(0)
    B, T, d = (2, 17, 768) if args.quick else (4, 197, 768)
    C, px = 64, (8 if args.quick else 32)
    image = torch.randn(8, C, px, px)
    seq = torch.randn(B, T, d)
    attn = SelfAttention(d)
    wrapped = peftlite.wrap(copy.deepcopy(attn), targets=nn.Linear, rank=RANK)
    common.randomize_adapters(wrapped)
    lean_linear = nn.Linear(d, 4 * d)  # wrap freezes a plain Linear it does not adapt into a LeanLinear
    holder = nn.Sequential(copy.deepcopy(lean_linear), nn.Linear(4 * d, 1))
    lean_frozen = peftlite.wrap(holder, targets="1", rank=RANK)[0]
    cases = [  # (label, trainable layer, input, frozen layer (None: a frozen copy), view of the input, shape shown)
        ("Linear(768, 3072)", nn.Linear(d, 4 * d), torch.randn(B * T, d), None, None, f"({B * T}, {d})"),
        ("Linear(768, 3072)", nn.Linear(d, 4 * d), seq, None, None, f"({B}, {T}, {d}) contiguous"),
        ("Linear(768, 3072)", nn.Linear(d, 4 * d), seq, None, lambda t: t.transpose(0, 1),
         f"({T}, {B}, {d}): ({B}, {T}, {d}).transpose(0, 1)"),
        ("the same, frozen by wrap (LeanLinear)", lean_linear, seq, lean_frozen, lambda t: t.transpose(0, 1),
         f"({T}, {B}, {d}): ({B}, {T}, {d}).transpose(0, 1)"),
        ("Conv2d(64, 64, 3, padding=1)", nn.Conv2d(C, C, 3, padding=1), image, None, None, str(tuple(image.shape))),
        ("BatchNorm2d(64), eval", nn.BatchNorm2d(C).eval(), image, None, None, str(tuple(image.shape))),
        ("LayerNorm(768)", nn.LayerNorm(d), seq, None, None, str(tuple(seq.shape))),
        ("MultiheadAttention(768, 12), self", attn, seq, None, None, str(tuple(seq.shape))),
        ("the same, wrap(targets=nn.Linear) (out_proj adapted)", attn, seq, wrapped, None, str(tuple(seq.shape))),
    ]
    rows = []
    for label, layer, x, frozen, view, shape in cases:
        if frozen is None:
            frozen = copy.deepcopy(layer).requires_grad_(False)
        fns = {"frozen": _fwd_bwd(frozen, x, view), "trainable": _fwd_bwd(layer, x, view)}
        per_round = rounds(fns, max(5, 4 * args.repeats))
        ms = {k: f"{1e3 * statistics.median(t[k] for t in per_round):.2f}" for k in fns}
        rows.append([label, shape, ms["frozen"], ms["trainable"], ratio(per_round, "frozen", "trainable")])
    return rows


# ---- the floor of a LoRA step (CNNs) ------------------------------------------------------------------------

def adapter_products_ms(model: nn.Module, x: Tensor) -> float:
    """Milliseconds of the r-wide products an exact LoRA backward runs, summed over the adapted convs of the
    wrapped ``model`` at the shapes of a forward on ``x`` (each product timed alone, median of 9)."""
    from peftlite.layers import conv_autograd as ca
    from peftlite.layers.conv import LoraConv2d
    shapes: dict[str, tuple[Tensor, torch.Size]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, (i[0].detach(), o.shape)))
             for n, m in model.named_modules() if isinstance(m, LoraConv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for name, (xi, out_shape) in shapes.items():
        layer = model.get_submodule(name)
        t = layer.terms("weight")[0]
        xp, c = peftlite.functional.pad_input(xi, layer.geometry)
        a = ca._filters(t.A.detach(), c, xp.dtype)
        B = t.B.detach()
        total += sum(common.timed(_products(xp, a, B, torch.randn(out_shape), c), 9).values())
    return 1e3 * total


def _products(x: Tensor, a: Tensor, B: Tensor, g: Tensor, c) -> dict[str, Callable[[], object]]:
    """The four r-wide products of a LoRA conv's backward, as ``conv_autograd`` runs them."""
    from peftlite.layers import conv_autograd as ca
    h, gh = ca._conv_a(x, a, c), ca._to_rank(g, B, c.groups)
    return {"h": lambda: ca._conv_a(x, a, c), "gh": lambda: ca._to_rank(g, B, c.groups),
            "dB": lambda: ca._grad_B(g, h, B, c.groups), "dA": lambda: ca._a_backward(gh, x, a, c, False, True)}


def floor(model_name: str, args) -> list[list[str]]:
    case = _lean_models.CASES[model_name](args.quick)
    built = {name: build(case, name) for name in ("frozen_dx", "lora")}
    off = build(case, "lora")

    def off_forward() -> Tensor:
        with peftlite.disabled(off.model):
            return case.loss(off.model, True)

    built["adapters_off_dx"] = Contender(off.model, off_forward, off.optimizer)
    for c in built.values():
        c.warm_up()
    per_round = rounds({k: c.step for k, c in built.items()}, args.repeats)
    ms = {k: 1e3 * statistics.median(t[k] for t in per_round) for k in built}
    products = adapter_products_ms(built["lora"].model, case.x)
    floor_ratios = [(t["adapters_off_dx"] + products / 1e3) / t["frozen_dx"] for t in per_round]
    return [[model_name, f"{ms['frozen_dx']:.1f}", f"{ms['adapters_off_dx']:.1f}",
             ratio(per_round, "adapters_off_dx", "frozen_dx"), f"{products:.1f}",
             f"{statistics.median(floor_ratios):.2f} [{min(floor_ratios):.2f}–{max(floor_ratios):.2f}]",
             f"{ms['lora']:.1f}", ratio(per_round, "lora", "frozen_dx")]]


# ---- report ------------------------------------------------------------------------------------------------

def table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A markdown table, or aligned text; a row with one message (a failure) runs past the columns in text."""
    if markdown:
        lines = [head, ["---"] * len(head), *rows]
        return "\n".join(f"| {' | '.join(r)} |" for r in lines)
    full = [head] + [r for r in rows if any(r[2:])]
    widths = [max(len(r[i]) for r in full) for i in range(len(head))]

    def line(r: list[str]) -> str:
        if not any(r[2:]):
            return f"{r[0].ljust(widths[0])}  {r[1]}"
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join(line(r) for r in [head, *rows])


MODEL_HEAD = ["contender", "saved MiB", "saved ÷ full", "live MiB", "peak RSS MiB", "time ms",
              "time ÷ full", "time ÷ frozen_dx"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (default 5; 2 with --quick)")
    ap.add_argument("--models", default=None, help="default: all five (--floor: resnet50)")
    ap.add_argument("--quick", action="store_true", help="32 px images, 16 tokens, 2 rounds: a smoke run")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--frozen-kinds", action="store_true", help="time single frozen vs trainable layers instead")
    ap.add_argument("--floor", action="store_true", help="the LoRA step's floor on the CNNs instead")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.models = args.models or ("resnet50" if args.floor else ",".join(_lean_models.CASES))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.one:  # the child of peak_rss: print the peak RSS growth of one step, in bytes
        model_name, name = args.one
        print(peak_rss_bytes(build(_lean_models.CASES[model_name](args.quick), name).step))
        return
    unknown = [m for m in args.models.split(",") if m not in _lean_models.CASES]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; known: {', '.join(_lean_models.CASES)}")
    command = " ".join(["PYTHONPATH=src python benchmarks/lean.py", *sys.argv[1:]])
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}: `{command}`\n", flush=True)
    if args.frozen_kinds:
        head = ["layer", "input", "frozen ms", "trainable ms", "frozen ÷ trainable"]
        print(table(head, frozen_kinds(args), args.markdown), flush=True)
    elif args.floor:
        head = ["model", "frozen_dx ms", "adapters_off_dx ms", "÷ frozen_dx", "adapter products ms",
                "floor ÷ frozen_dx", "lora ms", "lora ÷ frozen_dx"]
        rows = [r for m in args.models.split(",") for r in floor(m, args)]
        print(table(head, rows, args.markdown), flush=True)
    else:
        for model_name in args.models.split(","):
            case, rows = measure(model_name, args)
            gc.collect()  # the model's contenders (several copies of it) go before the next model's are built
            what = "token ids" if case.text else "input"
            title = f"{model_name}: batch {case.x.shape[0]}, {what} {tuple(case.x.shape[1:])}, r={RANK}"
            gap = "\n\n" if args.markdown else "\n"  # in markdown a line right after a table is a row of it
            notes = "".join(f"{gap}{n}" for n in case.notes)
            print(f"{'### ' if args.markdown else ''}{title}\n\n{table(MODEL_HEAD, rows, args.markdown)}{notes}\n",
                  flush=True)
    print(f"\nMachine: {common.machine()}")


if __name__ == "__main__":
    main()
