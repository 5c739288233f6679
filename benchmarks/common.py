"""What the benchmarks share: interleaved timing, adapters of a known size, PEFT's wrap, the machine line, and the
peak RSS growth of one merge in a fresh process. Every script in benchmarks/ imports this; none imports another
script's module (``run.py`` imports ``dora.py`` and ``mixed.py`` for its table).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import peft
except ImportError:  # benchmark-only extra
    peft = None

ROOT = Path(__file__).resolve().parents[1]
RATIO = 0.05  # std(scale·ΔW) / std(W) of the benchmark adapters: a trained adapter's typical size


def timed(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, run interleaved."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def randomize_adapters(model: nn.Module, ratio: float = RATIO) -> None:
    """Give every adapter (peftlite or PEFT) a nonzero B with std(scale·ΔW) ≈ ratio·std(W)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if hasattr(m, "lora") and isinstance(m.lora, nn.ModuleDict):  # peftlite: every adapted weight (MHA: q/k/v)
            for slot, p in m.pairs(next(iter(m.adapter_state.active))).items():
                w = m._parameters[slot]
                B = torch.randn(p.B.shape, generator=g)
                d = p.scale * (B @ p.A.detach().float())
                p.B.data.copy_(B * (ratio * float(w.float().std()) / float(d.std())))
        elif hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):  # PEFT
            A, Bm = m.lora_A["default"].weight, m.lora_B["default"].weight
            w = m.get_base_layer().weight
            B = torch.randn(Bm.shape, generator=g)
            a2 = A.detach().float().reshape(A.shape[0], -1)
            d = m.scaling["default"] * (B.reshape(B.shape[0], -1) @ a2)
            Bm.data.copy_(B * (ratio * float(w.float().std()) / float(d.std())))


def peft_wrap(model: nn.Module, targets: list[str], r: int) -> nn.Module:
    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


PEAK_SCRIPT = r"""
import sys, copy, torch, torch.nn as nn
sys.path.insert(0, {src!r})
which, dtype = sys.argv[1], getattr(torch, sys.argv[2])
sys.path.insert(0, {bench!r})
import common as R
n = {n}
base = nn.Sequential(nn.Linear(n, n, bias=False)).to(dtype)
if which == "ours":
    import peftlite
    m = peftlite.wrap(base, targets="0", rank=16); R.randomize_adapters(m)
    go = lambda: peftlite.merge(m)
else:
    m = R.peft_wrap(base, ["0"], 16); R.randomize_adapters(m)
    go = lambda: m.merge_adapter()
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
go()
print(rss("VmHWM:") - before)
"""


def peak_memory(dtype: torch.dtype, n: int) -> dict:
    """Peak RSS growth during one merge, measured in a fresh process for each library."""
    out = {}
    for which in ("ours", "peft") if peft else ("ours",):
        code = PEAK_SCRIPT.format(src=str(ROOT / "src"), bench=str(ROOT / "benchmarks"), n=n)
        try:
            proc = subprocess.run([sys.executable, "-c", code, which, str(dtype).split(".")[1]],
                                  capture_output=True, text=True, timeout=600)
            out[which] = int(proc.stdout.strip().splitlines()[-1])
        except Exception as e:  # clear_refs unavailable, etc.
            out[which] = f"n/a ({type(e).__name__})"
    return out


# ---- report ------------------------------------------------------------------------------------

def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), "
            f"PEFT {peft.__version__ if peft else 'not installed'}, Python {platform.python_version()}; "
            f"1-min load average at the end: {load:.1f}")
