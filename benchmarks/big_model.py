"""Big models on small machines: the adapter file's size, and the peak memory of save, load and merge.

    PYTHONPATH=src python benchmarks/big_model.py                 # a 1B-shaped model, bf16, every Linear r=16
    PYTHONPATH=src python benchmarks/big_model.py --shape 7b      # a 7B-shaped one (about 14 GB in bf16)
    PYTHONPATH=src python benchmarks/big_model.py --src OTHER/src # the same figures for another peftlite
    PYTHONPATH=src python benchmarks/big_model.py --calls load-wrapped load-fresh   # some of the calls

The model is a stack of LLaMA-shaped blocks (q, k, v, o: d×d; gate, up: d→f; down: f→d; no bias), built
on the meta device and materialised block by block (``to_empty`` + init), so building it never holds
more than the model plus one block. Every figure is measured in a fresh process, as the peak RSS growth
during the one call: /proc/self/status VmHWM after writing 5 to /proc/self/clear_refs, minus VmRSS
before the call (as ``benchmarks/run.py``'s ``peak_memory``). The model's own memory is not counted;
what a call allocates and keeps (the adapters a load into a fresh model creates, merge's exact-unmerge
records) is.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"1b": (16, 2048, 8192), "7b": (32, 4096, 11008)}  # (blocks, d, f): 1.07B and 6.5B parameters
CALLS = {"save": "save", "read": "read every tensor at once (native.read)",
         "load-wrapped": "load into the wrapped model", "load-fresh": "load into a fresh model",
         "merge": "merge (after a load)"}


class Block(nn.Module):
    def __init__(self, d: int, f: int, dtype: torch.dtype):
        super().__init__()
        shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
        for name, (i, o) in shapes.items():
            setattr(self, name, nn.Linear(i, o, bias=False, dtype=dtype, device="meta"))


def build(blocks: int, d: int, f: int, dtype: torch.dtype) -> nn.Module:
    """The model on the CPU, materialised one block at a time (weights ~ N(0, 0.02²), seeded)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*(Block(d, f, dtype) for _ in range(blocks)))
    for block in model:
        block.to_empty(device="cpu")
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02, generator=g)
    return model


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_growth(fn) -> tuple[int, int, float]:
    """(peak RSS growth, RSS kept after, seconds) of one call of ``fn``; "kept" after the C allocator has
    given its free memory back (``malloc_trim``), so that it counts what the call holds on to."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)  # glibc
    gc.collect()
    trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss("VmRSS:")
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = rss("VmHWM:") - before
    del out
    gc.collect()
    trim(0)
    return peak, rss("VmRSS:") - before, seconds


def child(args) -> None:
    """One measurement, in this fresh process; prints 'peak kept seconds [extra]'."""
    import peftlite
    from peftlite.formats import native

    blocks, d, f = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    model = build(blocks, d, f, dtype)
    extra = ""
    if args.child == "save":
        peftlite.wrap(model, nn.Linear, rank=args.rank)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a trained-looking B, so merge has work to do
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        go = lambda: peftlite.save(model, args.file)
    elif args.child == "load-wrapped":
        peftlite.wrap(model, nn.Linear, rank=args.rank)
        go = lambda: peftlite.load(model, args.file)
    elif args.child == "load-fresh":
        go = lambda: peftlite.load(model, args.file)
    elif args.child == "read":  # every tensor of the file at once, as load read it before it streamed
        go = lambda: native.read(args.file)
    elif args.child == "merge":
        peftlite.load(model, args.file)
        go = lambda: peftlite.merge(model)
    else:
        raise SystemExit(f"unknown child {args.child}")
    peak, kept, seconds = peak_growth(go)
    if args.child == "load-fresh":
        extra = str(sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora." in n))
    print(peak, kept, f"{seconds:.3f}", extra)


def run(mode: str, args, file: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--child", mode, "--file", file, "--shape", args.shape, "--dtype", args.dtype,
           "--rank", str(args.rank), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr}")
    return out.stdout.split()


def mib(n) -> str:
    return f"{int(n) / 2 ** 20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--src", default=str(ROOT / "src"), help="the peftlite source tree to measure")
    ap.add_argument("--calls", nargs="+", choices=list(CALLS), default=list(CALLS),
                    help="the calls to measure (the file is always saved first)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    blocks, d, f = SHAPES[args.shape]
    params = blocks * (4 * d * d + 3 * d * f)
    print(f"{args.shape}: {blocks} blocks, d={d}, f={f}: {params / 1e9:.2f}B parameters in {args.dtype} "
          f"({params * getattr(torch, args.dtype).itemsize / 2 ** 30:.2f} GiB); every Linear r={args.rank}; "
          f"peftlite from {args.src}; {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "adapter.safetensors")
        rows = []
        for mode in ["save"] + [c for c in args.calls if c != "save"]:
            label = CALLS[mode]
            peak, kept, seconds, *extra = run(mode, args, file)
            size = os.path.getsize(file)
            note = ""
            if extra:
                note = f"; the adapters it creates: {mib(extra[0])}, so {mib(int(peak) - int(extra[0]))} beyond them"
            rows.append(f"| {label} | {mib(peak)} ({int(peak) / size:.2f}× the file) | {mib(kept)} | "
                        f"{float(seconds):.2f} s{note} |")
            print(rows[-1], flush=True)
        print(f"\nadapter file: {mib(size)} ({size} bytes)\n")
        print("| call | peak RSS growth | kept after | time |\n|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
