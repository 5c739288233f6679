"""Every GPU figure of issue 13 in one run, each beside its goal; budgeted at under 5 minutes on an H200.

    PYTHONPATH=src python benchmarks/gpu.py                       # on the GPU machine: all sections
    PYTHONPATH=src python benchmarks/gpu.py --only merge,model    # a subset (names below)
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu.py --dry-run   # a CPU check of the script itself

Sections (``--only``; each prints a markdown table, flushed row by row, and one failing section is
printed and skipped):

- ``merge``: Triton merge/unmerge of 8192² and 4096×11008 weights, fp32/bf16/fp16, r=16,
  std(ΔW)/std(W) = 0.05. Bandwidth counts one read and one write of W per merge, as a % of the copy
  bandwidth measured here (``dst.copy_(src)``, 1 GiB); peak extra memory is ``max_memory_allocated``
  growth during one merge; PEFT's merge and ``addmm_`` beside.
- ``model``: a 7B-shaped stack (32 blocks of q, k, v, o, gate, up, down: 224 bf16 ``nn.Linear``), r=16 on
  all: ``peftlite.merge`` + ``unmerge`` (bit-exact against a clone of every weight) vs PEFT's
  ``merge_adapter`` + ``unmerge_adapter`` on the same weights.
- ``forward``: unmerged Linear forward, d=4096, r=16, bf16, N = 1 … 8192, ÷ the base Linear.
- ``resnet``: ResNet-50 training step (every conv r=8, batch 32, 224 px, bf16 autocast) ÷ the frozen-base
  step (as ``benchmarks/run.py`` defines it), with every conv forced onto each path too, and the path
  the cost model (``peftlite.layers.conv.training_path``) picked for each conv.
- ``mixed``: mixed-adapter batch (``benchmarks/mixed.py``'s contenders): 2 × Linear 1024, r=16,
  batch 64, 4/16/64 adapters, time added over the base, peftlite's ``per_sample`` vs PEFT's
  ``adapter_names=``.
- ``tests``: the CUDA-only tests (``-k "(cuda or triton) and not interpreter"``), with a timeout.
- ``sweep`` (not run by default): bf16 merge at a few Triton tile shapes.

``--dry-run`` runs every section on the CPU at tiny shapes (merge weights 64×64 and 64×172, a
2-block stack with d=64, ResNet-18 at 32 px batch 2, d=64), timed with ``perf_counter``, the Triton
kernels run by the interpreter (the script re-executes itself with ``TRITON_INTERPRET=1`` if it is not
set, and sets ``PEFTLITE_KERNELS=triton`` so whole-model merges take the Triton path), and the tests
section only collects the CUDA tests (about 45 s on 2 CPU cores). Its figures mean nothing; its exact
flags must read True.

Time on the H200 (not yet measured; each section prints its own time): Triton compiles its kernels on
the first merge of each dtype; the stack section builds 12 GiB three times (a reference clone, then the
peftlite and PEFT models) and holds at most about 26 GiB; the tests run under a 180 s timeout. The
device needs a CUDA torch with Triton, PEFT, torchvision and pytest.
"""

from __future__ import annotations

import os
import sys


def _interpreter_for_dry_run() -> None:
    """A dry run needs the Triton interpreter, which Triton reads when it is imported: re-exec with it set."""
    if "--dry-run" in sys.argv and os.environ.get("TRITON_INTERPRET") != "1":
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


_interpreter_for_dry_run()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import peftlite  # noqa: E402
from peftlite.layers import adapted_layers, conv  # noqa: E402

try:
    import peft
except ImportError:  # benchmark-only extra
    peft = None

ROOT = Path(__file__).resolve().parents[1]
RATIO = 0.05  # std(scale·ΔW) / std(W)
RANK = 16
CUDA_TESTS = ["tests/kernels/test_kernels.py", "tests/kernels/test_gain.py", "tests/tuning/test_amp.py"]
CUDA_SELECTION = "(cuda or triton) and not interpreter"
TESTS_TIMEOUT_S = 180


@dataclass(frozen=True)
class Plan:
    """Shapes and repeats of one run: the device run, or the CPU dry run."""

    weights: tuple  # (rows, cols) of the merged weights
    copy_bytes: int
    merge_repeats: int
    stack: tuple  # (blocks, d, f) of the 7B-shaped stack
    stack_repeats: int
    forward_d: int
    forward_ns: tuple
    forward_repeats: int
    resnet: str
    resnet_batch: int
    resnet_px: int
    resnet_repeats: int
    mixed_d: int
    mixed_batch: int
    mixed_ks: tuple
    mixed_repeats: int


DEVICE_PLAN = Plan(weights=((8192, 8192), (4096, 11008)), copy_bytes=2**30, merge_repeats=10,
                   stack=(32, 4096, 11008), stack_repeats=3,
                   forward_d=4096, forward_ns=(1, 8, 64, 512, 2048, 8192), forward_repeats=50,
                   resnet="resnet50", resnet_batch=32, resnet_px=224, resnet_repeats=10,
                   mixed_d=1024, mixed_batch=64, mixed_ks=(4, 16, 64), mixed_repeats=50)
DRY_PLAN = Plan(weights=((64, 64), (64, 172)), copy_bytes=2**22, merge_repeats=2,
                stack=(2, 64, 172), stack_repeats=1,
                forward_d=64, forward_ns=(1, 8, 64), forward_repeats=3,
                resnet="resnet18", resnet_batch=2, resnet_px=32, resnet_repeats=2,
                mixed_d=64, mixed_batch=64, mixed_ks=(4, 16, 64), mixed_repeats=3)

DEV = torch.device("cuda")
PLAN = DEVICE_PLAN


# ---- timing and memory ---------------------------------------------------------------------------

def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def mark():
    """A point in time: a recorded CUDA event on the GPU, perf_counter on the CPU."""
    if DEV.type != "cuda":
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def seconds(a, b) -> float:
    if DEV.type != "cuda":
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def timed(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, run interleaved (round-robin)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            a = mark()
            f()
            times[k].append(seconds(a, mark()))
    return {k: statistics.median(v) for k, v in times.items()}


def cycle(merge, unmerge, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``merge()`` and of ``unmerge(merge's result)``, over merge/unmerge cycles."""
    for _ in range(warmup):
        unmerge(merge())
    sync()
    tm, tu = [], []
    for _ in range(repeats):
        a = mark()
        state = merge()
        b = mark()
        unmerge(state)
        c = mark()
        tm.append(seconds(a, b))
        tu.append(seconds(b, c))
    return statistics.median(tm), statistics.median(tu)


def peak_extra(fn):
    """``(fn(), bytes allocated on the GPU beyond what was allocated before, at the peak)``; None on the CPU."""
    if DEV.type != "cuda":
        return fn(), None
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    return out, torch.cuda.max_memory_allocated() - before


def copy_bandwidth() -> float:
    """Bytes per second of ``dst.copy_(src)``, counting the read and the write."""
    src = torch.empty(PLAN.copy_bytes, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed({"copy": lambda: dst.copy_(src)}, 10)["copy"]


# ---- problems ------------------------------------------------------------------------------------

def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _factors(m: nn.Module):
    """``(A, B, scale, W)`` of a peftlite or PEFT adapted layer's active adapter, else None."""
    if hasattr(m, "lora") and isinstance(m.lora, nn.ModuleDict):  # peftlite
        p = m.pairs(next(iter(m.adapter_state.active)))["weight"]
        return p.A, p.B, p.scale, m._parameters["weight"]
    if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):  # PEFT
        return (m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"],
                m.get_base_layer().weight)
    return None


@torch.no_grad()
def set_adapters(model: nn.Module, ratio: float = RATIO, seed: int = 0) -> None:
    """Every adapter's B random, with std(scale·ΔW) = ratio·std(W), on the layer's own device."""
    for m in model.modules():
        f = _factors(m)
        if f is None:
            continue
        A, B, scale, W = f
        g = torch.Generator(device=B.device).manual_seed(seed)
        seed += 1
        b = torch.randn(B.shape, generator=g, device=B.device)
        d = scale * (b.reshape(b.shape[0], -1) @ A.float().reshape(A.shape[0], -1))
        B.copy_(b * (ratio * float(W.float().std()) / float(d.std())))


def peft_wrap(model: nn.Module, targets: list[str], r: int) -> nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0))


def triton_host():
    from peftlite.kernels import _triton
    return _triton


def ms(s) -> str:
    return f"{1e3 * s:.2f} ms" if isinstance(s, float) else "n/a"


def pct(nbytes: int, s: float, ceiling: float) -> str:
    return f"{100 * nbytes / s / ceiling:.0f}%"


def verdict(misses: list[str]) -> str:
    return "yes" if not misses else "no: " + "; ".join(misses)


# ---- 1. merge / unmerge bandwidth ----------------------------------------------------------------

def merge_problem(rows: int, cols: int, dtype: torch.dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    W = torch.randn(rows, cols, device=DEV, generator=g).to(dtype)
    A = torch.randn(RANK, cols, device=DEV, generator=g)
    B = torch.randn(rows, RANK, device=DEV, generator=g)
    return W, A, B, RATIO * float(W.float().std()) / float((B @ A).std())


def peft_merge(rows: int, cols: int, dtype: torch.dtype):
    """PEFT's merge and unmerge of one Linear with this weight shape: (merge s, unmerge s, exact)."""
    if peft is None:
        return None, None, None
    pm = peft_wrap(nn.Sequential(nn.Linear(cols, rows, bias=False)).to(DEV, dtype), ["0"], RANK)
    set_adapters(pm)
    w = pm.base_model.model[0].get_base_layer().weight
    w0 = w.detach().clone()
    t_m, t_u = cycle(pm.merge_adapter, lambda _: pm.unmerge_adapter(), max(3, PLAN.merge_repeats // 2))
    return t_m, t_u, same_bits(w, w0)


def merge_row(rows: int, cols: int, dtype: torch.dtype, ceiling: float) -> str:
    tri = triton_host()
    W, A, B, scale = merge_problem(rows, cols, dtype)
    W0 = W.clone()
    merge, unmerge = (lambda: tri.merge_(W, A, B, scale)), (lambda rec: tri.unmerge_(W, A, B, scale, rec))
    t_m, t_u = cycle(merge, unmerge, PLAN.merge_repeats, warmup=2)
    exact = same_bits(W, W0)
    rec, peak = peak_extra(merge)
    unmerge(rec)
    exact = exact and same_bits(W, W0)
    Bd, Ad = B.to(dtype), A.to(dtype)
    t_addmm = timed({"addmm": lambda: W.addmm_(Bd, Ad, alpha=scale)}, PLAN.merge_repeats)["addmm"]
    W.copy_(W0)
    p_m, p_u, p_exact = peft_merge(rows, cols, dtype)
    wbytes = W.numel() * W.element_size()
    held_bits, bound_bits = 8 * rec.nbytes / W.numel(), W.element_size()  # bound: 1/8 of W's bytes
    misses = [f"{what} {100 * 2 * wbytes / t / ceiling:.0f}% < 50%"
              for what, t in (("merge", t_m), ("unmerge", t_u)) if 2 * wbytes / t < 0.5 * ceiling]
    misses += [] if exact else ["not exact"]
    misses += [] if held_bits <= bound_bits else ["held > bound"]
    misses += [] if peak is None or peak <= wbytes / 8 else ["peak > W/8"]
    misses += [] if p_m is None or t_m < p_m else ["slower than PEFT"]
    peak_s = "n/a (CPU)" if peak is None else f"{peak / 2**20:.1f} MiB ({peak / wbytes:.1%})"
    peft_s = "n/a" if p_m is None else f"{ms(p_m)} / {ms(p_u)} (exact: {p_exact})"
    return (f"| {rows}×{cols} {str(dtype)[6:]} | {exact} | {ms(t_m)} ({pct(2 * wbytes, t_m, ceiling)}) | "
            f"{ms(t_u)} ({pct(2 * wbytes, t_u, ceiling)}) | {ms(t_addmm)} ({pct(2 * wbytes, t_addmm, ceiling)}) | "
            f"{peft_s} | {held_bits:.3f} (≤ {bound_bits}) | {peak_s} | {verdict(misses)} |")


def section_merge() -> None:
    ceiling = copy_bandwidth()
    print(f"copy bandwidth (dst.copy_(src), {PLAN.copy_bytes / 2**20:.0f} MiB): {ceiling / 1e9:.0f} GB/s "
          "(read + write)\n\ngoal: merge and unmerge ≥ 50% of copy bw (stretch 80%), bit-exact, held ≤ 1/8 of W, "
          "peak extra ≤ 1/8 of W (12.5%), merge faster than PEFT's\n")
    print("| W (r=16, ratio 0.05) | exact | peftlite merge (% copy bw) | peftlite unmerge (% copy bw) | addmm_ | "
          "PEFT merge / unmerge | held bits/el (bound) | peak extra during merge (÷ W) | goals met |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for rows, cols in PLAN.weights:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            print(merge_row(rows, cols, dtype, ceiling), flush=True)
            gc.collect()
            if DEV.type == "cuda":
                torch.cuda.empty_cache()


def section_sweep() -> None:
    """bf16 merge at a few tile shapes (each merges and unmerges with its own, so records stay consistent)."""
    tri = triton_host()
    ceiling = copy_bandwidth()
    saved = tri.BM, tri.BN, tri.WARPS
    rows, cols = PLAN.weights[0]
    W, A, B, scale = merge_problem(rows, cols, torch.bfloat16)
    W0 = W.clone()
    print(f"| tile (BM×BN, warps), bf16 {rows}×{cols} | merge (% copy bw) | unmerge | exact |\n|---|---|---|---|")
    try:
        for bm, bn, warps in ((32, 128, 8), (32, 64, 4), (64, 128, 8), (16, 256, 8), (32, 256, 16)):
            tri.BM, tri.BN, tri.WARPS = bm, bn, warps
            t_m, t_u = cycle(lambda: tri.merge_(W, A, B, scale), lambda rec: tri.unmerge_(W, A, B, scale, rec),
                             max(2, PLAN.merge_repeats // 2))
            print(f"| {bm}×{bn}, {warps} | {ms(t_m)} ({pct(2 * W.numel() * 2, t_m, ceiling)}) | {ms(t_u)} | "
                  f"{same_bits(W, W0)} |", flush=True)
    finally:
        tri.BM, tri.BN, tri.WARPS = saved


# ---- 2. whole-model merge ------------------------------------------------------------------------

def llama_stack(blocks: int, d: int, f: int) -> nn.Module:
    """``blocks`` × (q, k, v, o: d→d; gate, up: d→f; down: f→d), bf16, no bias, weights ~ N(0, 0.02²), seeded."""
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    with torch.device("meta"):
        model = nn.Sequential(*(nn.ModuleDict({n: nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
                                               for n, (i, o) in shapes.items()}) for _ in range(blocks)))
    model.to_empty(device=DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


def base_weights(model: nn.Module) -> list[torch.Tensor]:
    """The Linear weights of a peftlite- or PEFT-wrapped stack, in module order (adapters left out)."""
    return [p for n, p in model.named_parameters() if n.endswith("weight") and ".lora" not in n and "lora_" not in n]


def count_exact(weights: list[torch.Tensor], ref: list[torch.Tensor]) -> int:
    return sum(same_bits(w, r) for w, r in zip(weights, ref, strict=True))


@contextlib.contextmanager
def counting_launches():
    """Count the Triton kernel launches of peftlite's merge/unmerge inside the block (``counts[0]``)."""
    tri = triton_host()
    real, counts = tri._launch, [0]

    def launch(*args, **kwargs):
        counts[0] += 1
        return real(*args, **kwargs)

    tri._launch = launch
    try:
        yield counts
    finally:
        tri._launch = real


def stack_peftlite(ref: list[torch.Tensor]) -> tuple[str, float, bool]:
    blocks, d, f = PLAN.stack
    model = peftlite.wrap(llama_stack(blocks, d, f), targets=nn.Linear, rank=RANK)
    set_adapters(model)
    weights = base_weights(model)
    same_build = count_exact(weights, ref)
    with counting_launches() as launches:
        _, peak = peak_extra(lambda: peftlite.merge(model))
    backends = sorted({r.backend for _, m in adapted_layers(model) for r in m.adapter_state.records.values()})
    changed = len(weights) - count_exact(weights, ref)
    peftlite.unmerge(model)
    t_m, t_u = cycle(lambda: peftlite.merge(model), lambda _: peftlite.unmerge(model), PLAN.stack_repeats, warmup=0)
    exact = count_exact(weights, ref)
    wbytes = sum(w.numel() * w.element_size() for w in weights)
    peak_s = "n/a (CPU)" if peak is None else f"{peak / 2**20:.0f} MiB ({peak / wbytes:.2%} of the weights)"
    row = (f"| peftlite merge / unmerge | {ms(t_m)} | {ms(t_u)} | {exact == len(weights)} ({exact}/{len(weights)}"
           f" bit-identical) | backend {', '.join(backends)}; {launches[0]} Triton launches per merge; "
           f"{changed}/{len(weights)} weights changed by the merge; built like the reference: {same_build}/"
           f"{len(weights)}; peak extra {peak_s} |")
    return row, t_m, exact == len(weights) and changed == len(weights)


def stack_peft(ref: list[torch.Tensor]) -> tuple[str, float | None]:
    if peft is None:
        return "| PEFT merge_adapter / unmerge_adapter | n/a | n/a | n/a | PEFT not installed |", None
    blocks, d, f = PLAN.stack
    model = peft_wrap(llama_stack(blocks, d, f), ["q", "k", "v", "o", "gate", "up", "down"], RANK)
    set_adapters(model)
    weights = base_weights(model)
    same_build = count_exact(weights, ref)
    _, peak = peak_extra(model.merge_adapter)
    model.unmerge_adapter()
    t_m, t_u = cycle(model.merge_adapter, lambda _: model.unmerge_adapter(), PLAN.stack_repeats, warmup=0)
    exact = count_exact(weights, ref)
    wbytes = sum(w.numel() * w.element_size() for w in weights)
    peak_s = "n/a (CPU)" if peak is None else f"{peak / 2**20:.0f} MiB ({peak / wbytes:.2%} of the weights)"
    return (f"| PEFT merge_adapter / unmerge_adapter | {ms(t_m)} | {ms(t_u)} | {exact == len(weights)} "
            f"({exact}/{len(weights)} bit-identical) | built like the reference: {same_build}/{len(weights)}; "
            f"peak extra {peak_s} |"), t_m


def section_model() -> None:
    blocks, d, f = PLAN.stack
    ref = [w.detach().clone() for w in base_weights(llama_stack(blocks, d, f))]
    gc.collect()
    gib = sum(r.numel() * r.element_size() for r in ref) / 2**30
    print(f"{blocks} blocks × 7 Linear = {7 * blocks} bf16 layers, d={d}, f={f} ({gib:.2f} GiB), r={RANK} on all, "
          f"ratio {RATIO}; {PLAN.stack_repeats} timed cycle(s) after one checked merge")
    print("goal: peftlite merges and unmerges every layer bit-exactly, merge faster than PEFT's merge_adapter\n")
    print("| contender | merge (all layers) | unmerge | exact after all cycles | notes |\n|---|---|---|---|---|",
          flush=True)
    row, t_ours, ok = stack_peftlite(ref)
    print(row, flush=True)
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    row, t_peft = stack_peft(ref)
    print(row, flush=True)
    misses = [] if ok else ["not exact, or a weight the merge left unchanged"]
    misses += [] if t_peft is None or t_ours < t_peft else [f"merge {t_ours / t_peft:.1f}× PEFT's"]
    print(f"\ngoals met: {verdict(misses)}", flush=True)


# ---- 3. unmerged Linear forward ------------------------------------------------------------------

def section_forward() -> None:
    d = PLAN.forward_d
    base = nn.Sequential(nn.Linear(d, d)).to(DEV, torch.bfloat16)
    ours = peftlite.wrap(copy.deepcopy(base), targets="0", rank=RANK)
    set_adapters(ours)
    models = {"base": base, "peftlite": ours}
    if peft:
        models["PEFT"] = peft_wrap(copy.deepcopy(base), ["0"], RANK)
        set_adapters(models["PEFT"])
    print(f"goal: peftlite ≤ 1.5× the base Linear at N ≤ 64 (PEFT measured 4.3–4.7×)\n\n"
          f"| N (bf16, d={d}, r={RANK}) | base | peftlite ÷ base | PEFT ÷ base | goal met |\n|---|---|---|---|---|",
          flush=True)
    with torch.no_grad():
        for n in PLAN.forward_ns:
            x = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
            t = timed({k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, PLAN.forward_repeats, warmup=3)
            ratio = t["peftlite"] / t["base"]
            peft_ratio = f"{t['PEFT'] / t['base']:.2f}" if "PEFT" in t else "n/a"
            met = ("yes" if ratio <= 1.5 else "no") if n <= 64 else "—"
            print(f"| {n} | {1e6 * t['base']:.1f} µs | {ratio:.2f} | {peft_ratio} | {met} |", flush=True)


# ---- 4. ResNet-50 training step ------------------------------------------------------------------

def resnet_models() -> dict[str, nn.Module]:
    """base (frozen), full (all trainable), ours (every conv r=8), as benchmarks/run.py's ``resnet``."""
    from torchvision import models as tv
    torch.manual_seed(0)
    base = getattr(tv, PLAN.resnet)()
    full = copy.deepcopy(base)
    ours = peftlite.wrap(copy.deepcopy(base), targets=nn.Conv2d, rank=8)
    set_adapters(ours)
    for p in base.parameters():
        p.requires_grad_(False)
    return {k: m.to(DEV).train() for k, m in {"base": base, "full": full, "ours": ours}.items()}


def train_step(m: nn.Module, x: torch.Tensor, input_grad: bool) -> None:
    xi = x.clone().requires_grad_(input_grad)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y = m(xi)
    y.float().square().mean().backward()
    m.zero_grad(set_to_none=True)


@contextlib.contextmanager
def forced_path(mode: str | None):
    """Every adapted conv on one training path (None: the cost model's choice)."""
    real = conv.training_path
    if mode is not None:
        conv.training_path = lambda geom, rank, pixels=None: mode
    try:
        yield
    finally:
        conv.training_path = real


def conv_choices(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """The training path the cost model picks for each adapted conv in one step: name -> (geometry, pixels, path)."""
    current, picked, real = [""], {}, conv.training_path
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: current.__setitem__(0, n))
             for n, m in model.named_modules() if isinstance(m, conv.LoraConv2d)]

    def spy(geom, rank, pixels=None):
        picked[current[0]] = (geom, pixels, real(geom, rank, pixels))
        return picked[current[0]][2]

    conv.training_path = spy
    try:
        train_step(model, x, False)
    finally:
        conv.training_path = real
        for h in hooks:
            h.remove()
    return picked


def section_resnet() -> None:
    m = resnet_models()
    x = torch.randn(PLAN.resnet_batch, 3, PLAN.resnet_px, PLAN.resnet_px, device=DEV)

    def ours(mode):
        def go():
            with forced_path(mode):
                train_step(m["ours"], x, False)
        return go

    fns = {"frozen base": lambda: train_step(m["base"], x, True),
           "full fine-tune": lambda: train_step(m["full"], x, False),
           "peftlite (cost model)": ours(None), "peftlite, every conv activations": ours("activations"),
           "peftlite, every conv merged": ours("merged"), "peftlite, every conv dense": ours("dense")}
    t = timed(fns, PLAN.resnet_repeats)
    print(f"goal: peftlite step ≤ 1.15 × the frozen-base step (RANK_PASS_COST = {conv.RANK_PASS_COST}, "
          f"WEIGHT_PASS_COST = {conv.WEIGHT_PASS_COST})\n\n| {PLAN.resnet} step, batch {PLAN.resnet_batch}, "
          f"{PLAN.resnet_px} px, bf16 autocast, r=8 | ms | ÷ frozen-base step | goal met |\n|---|---|---|---|")
    for k, v in t.items():
        met = ("yes" if v / t["frozen base"] <= 1.15 else "no") if k == "peftlite (cost model)" else "—"
        print(f"| {k} | {1e3 * v:.2f} | {v / t['frozen base']:.3f} | {met} |", flush=True)
    picked = conv_choices(m["ours"], x)
    counts = {p: sum(1 for *_, q in picked.values() if q == p) for p in ("activations", "merged", "dense")}
    print(f"\ncost model's choices ({len(picked)} convs): {counts}\n\n"
          "| conv | out × in/groups × k | output pixels | path |\n|---|---|---|---|")
    for name, (g, pixels, path) in picked.items():
        print(f"| {name} | {g.out_channels}×{g.in_channels // g.groups}×{g.kernel_size[0]}×{g.kernel_size[1]} "
              f"| {pixels} | {path} |", flush=True)


# ---- 5. mixed-adapter batch ----------------------------------------------------------------------

def mixed_case(K: int) -> dict[str, float]:
    """benchmarks/mixed.py's Linear case on this device: 2 × Linear d, r=16, K adapters over the batch."""
    import mixed  # benchmarks/mixed.py
    torch.manual_seed(0)
    d = PLAN.mixed_d
    base = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d)).to(DEV).eval()
    x = torch.randn(PLAN.mixed_batch, d).to(DEV)
    route = torch.randint(0, K, (x.shape[0],), generator=torch.Generator().manual_seed(0)).tolist()
    fns = mixed.contenders(base, ["0", "1"], RANK, K, route)
    with torch.no_grad():
        want = fns["ours"](x)
        if "peft" in fns:
            torch.testing.assert_close(fns["peft"](x), want, rtol=1e-3, atol=1e-3)  # same adapters, same route
        return timed({k: (lambda f=f: f(x)) for k, f in fns.items()}, PLAN.mixed_repeats, warmup=3)


def section_mixed() -> None:
    print("goal: the time a mixed batch adds over the base ≤ 1/3 of what PEFT's adapter_names= adds, at 16 and 64 "
          f"adapters\n\n| K adapters (2 × Linear {PLAN.mixed_d}, r=16, batch {PLAN.mixed_batch}, fp32) | base | "
          "peftlite adds | PEFT adds | ours ÷ PEFT (added) | goal met |\n|---|---|---|---|---|---|", flush=True)
    for K in PLAN.mixed_ks:
        t = mixed_case(K)
        ours, theirs = t["ours"] - t["base"], t.get("peft", float("nan")) - t["base"]
        met = ("yes" if ours <= theirs / 3 else "no") if K >= 16 and "peft" in t else "—"
        print(f"| {K} | {ms(t['base'])} | {ms(ours)} | {ms(theirs)} | {ours / theirs:.2f} | {met} |", flush=True)


# ---- 6. CUDA tests -------------------------------------------------------------------------------

def section_tests(dry: bool) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", CUDA_SELECTION, *CUDA_TESTS]
    if dry:
        cmd.append("--collect-only")
    print(f"$ {shlex.join(cmd[2:])}" + ("  (dry run: collected, not run)" if dry else ""), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"TIMED OUT after {TESTS_TIMEOUT_S} s\n{out[-3000:]}", flush=True)
        return
    print(proc.stdout[-4000:], proc.stderr[-2000:], f"exit code {proc.returncode}", flush=True)


# ---- driver --------------------------------------------------------------------------------------

SECTIONS = {"merge": ("1. merge / unmerge bandwidth", section_merge),
            "model": ("2. whole-model merge, 7B-shaped stack", section_model),
            "forward": ("3. unmerged Linear forward", section_forward),
            "resnet": ("4. ResNet training step", section_resnet),
            "mixed": ("5. mixed-adapter batch", section_mixed),
            "tests": ("6. CUDA tests", None),
            "sweep": ("merge tile sweep (optional)", section_sweep)}
DEFAULT = ["merge", "model", "forward", "resnet", "mixed", "tests"]


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(dry: bool) -> str:
    versions = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {version('triton')}, "
                f"PEFT {version('peft')}, torchvision {version('torchvision')}, Python {platform.python_version()}")
    if dry:
        return (f"device: CPU DRY RUN (tiny shapes, Triton interpreter, perf_counter timer: the figures mean "
                f"nothing; the exact flags do); {versions}")
    props = torch.cuda.get_device_properties(0)
    return f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; {versions}"


def run_section(name: str, dry: bool) -> None:
    title, fn = SECTIONS[name]
    print(f"\n## {title}\n", flush=True)
    t = time.perf_counter()
    try:
        if name == "tests":
            section_tests(dry)
        else:
            fn()
    except Exception:
        print(f"SECTION {name} FAILED:\n{traceback.format_exc()}", flush=True)
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    print(f"\n({name}: {time.perf_counter() - t:.1f} s)", flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(DEFAULT),
                    help=f"comma-separated sections, of: {', '.join(SECTIONS)} (default: all but sweep)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks the script")
    args = ap.parse_args()
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    return args, names


def main() -> None:
    global DEV, PLAN
    start = time.perf_counter()
    args, names = parse_args()
    if args.dry_run:
        DEV, PLAN = torch.device("cpu"), DRY_PLAN
        os.environ["PEFTLITE_KERNELS"] = "triton"  # whole-model merges take the Triton kernels (interpreted)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 is set: unset it for the device run (it is for --dry-run only)")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this script measures a GPU (use --dry-run to check it on the CPU)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/mixed.py
    print(header(args.dry_run), flush=True)
    for name in names:
        run_section(name, args.dry_run)
    print(f"\ntotal wall time: {time.perf_counter() - start:.1f} s (goal on the H200: < 300 s)", flush=True)


if __name__ == "__main__":
    main()
