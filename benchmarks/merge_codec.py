"""Exact merge + unmerge against PEFT's, torch's fused addmm_ and a two-pass floor, in one process, interleaved.

    PYTHONPATH=src python benchmarks/merge_codec.py [--threads 1] [--n 4096] [--repeats 7]

For each dtype (fp32, bf16, fp16), a 4096² Linear with a rank-16 adapter, std(scale·ΔW) = 0.05·std(W):

- peftlite: ``peftlite.merge`` then ``peftlite.unmerge`` (exact: the window code, docs/exact-unmerge.md);
- PEFT: ``merge_adapter`` then ``unmerge_adapter`` (inexact);
- addmm_: ``W.addmm_(B, A, alpha=s)`` then ``alpha=-s`` (inexact, torch's fused in-place update);
- floor: two ``W.view(int).add_(0)`` passes (an integer pass reads and writes W once).

Then the bits the record holds per element at std(ΔW)/std(W) = 0.01, 0.1 and 1 (256², r = 16), and the peak
RSS growth of one merge in a fresh process (``common.peak_memory``).

    PYTHONPATH=src python benchmarks/merge_codec.py --vit [--threads 1]

instead times a whole model's merge + unmerge: torchvision's ViT-B/16 (random init) with rank-16 adapters on
its 24 MLP Linears (768×3072 and 3072×768), peftlite's against PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402  (the shared timing, adapter and machine helpers)

import peftlite  # noqa: E402
from peftlite import kernels  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def contenders(dtype: torch.dtype, n: int) -> dict:
    base = nn.Sequential(nn.Linear(n, n, bias=False)).to(dtype)
    ours = peftlite.wrap(copy.deepcopy(base), targets="0", rank=16)
    common.randomize_adapters(ours)
    pair = ours[0].pairs(next(iter(ours[0].adapter_state.active)))["weight"]
    w = ours[0]._parameters["weight"].data
    fns = {"peftlite": lambda: (peftlite.merge(ours), peftlite.unmerge(ours))}
    if common.peft:
        theirs = common.peft_wrap(copy.deepcopy(base), ["0"], 16)
        common.randomize_adapters(theirs)
        fns["peft"] = lambda: (theirs.merge_adapter(), theirs.unmerge_adapter())
    plain = copy.deepcopy(base)[0].weight.data
    A, B, s = pair.A.detach().to(dtype), pair.B.detach().to(dtype), pair.scale
    fns["addmm_"] = lambda: (plain.addmm_(B, A, alpha=s), plain.addmm_(B, A, alpha=-s))
    as_int = copy.deepcopy(base)[0].weight.data.view(INT[dtype])
    fns["floor"] = lambda: (as_int.add_(0), as_int.add_(0))
    w0 = w.clone()
    fns["peftlite"]()
    exact = torch.equal(w.view(INT[dtype]), w0.view(INT[dtype]))
    return fns, exact


def bits_held(dtype: torch.dtype, ratio: float) -> tuple[float, int]:
    g = torch.Generator().manual_seed(7)
    W = torch.randn(256, 256, generator=g).to(dtype)
    A, B = torch.randn(16, 256, generator=g), torch.randn(256, 16, generator=g)
    scale = ratio / float((B @ A).std())
    rec = kernels.merge_(W, A, B, scale)
    return rec.bits_per_element, rec.escape_index.numel()


def vit_mlp(repeats: int) -> None:
    import torchvision

    base = torchvision.models.vit_b_16()
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and ".mlp." in n]
    ours = peftlite.wrap(copy.deepcopy(base), targets=names, rank=16)
    common.randomize_adapters(ours)
    fns = {"peftlite": lambda: (peftlite.merge(ours), peftlite.unmerge(ours))}
    if common.peft:
        theirs = common.peft_wrap(copy.deepcopy(base), names, 16)
        common.randomize_adapters(theirs)
        fns["peft"] = lambda: (theirs.merge_adapter(), theirs.unmerge_adapter())
    ms = {k: v * 1e3 for k, v in common.timed(fns, repeats).items()}
    line = f"ViT-B/16, {len(names)} MLP Linears, r = 16, merge + unmerge: peftlite {ms['peftlite']:.1f} ms"
    if "peft" in ms:
        line += f", PEFT {ms['peft']:.1f} ms (PEFT ÷ peftlite {ms['peft'] / ms['peftlite']:.2f}×)"
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--vit", action="store_true", help="a whole model's merge instead: ViT-B/16's MLP Linears")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"`PYTHONPATH=src python benchmarks/merge_codec.py {' '.join(sys.argv[1:])}`\n")
    if args.vit:
        vit_mlp(args.repeats)
        print(f"\nMachine: {common.machine()}")
        return
    print("| dtype | peftlite ms | PEFT ms | addmm_ ms | floor ms | PEFT ÷ peftlite | peftlite ÷ addmm_ "
          "| peftlite ÷ floor | exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in DTYPES:
        fns, exact = contenders(dtype, args.n)
        t = common.timed(fns, args.repeats)
        ms = {k: v * 1e3 for k, v in t.items()}
        peft = f"{ms['peft']:.1f}" if "peft" in ms else "n/a"
        speedup = f"{ms['peft'] / ms['peftlite']:.2f}×" if "peft" in ms else "n/a"
        print(f"| {str(dtype).removeprefix('torch.')} | {ms['peftlite']:.1f} | {peft} | {ms['addmm_']:.1f} | "
              f"{ms['floor']:.1f} | {speedup} | {ms['peftlite'] / ms['addmm_']:.2f}× | "
              f"{ms['peftlite'] / ms['floor']:.1f}× | {exact} |", flush=True)
    print("\n| std(ΔW)/std(W) | " + " | ".join(str(d).removeprefix("torch.") for d in DTYPES) + " |")
    print("|---|" + "---|" * len(DTYPES))
    for ratio in (0.01, 0.1, 1.0):
        cells = [bits_held(d, ratio) for d in DTYPES]
        print(f"| {ratio} | " + " | ".join(f"{b:.3f} ({e} escapes)" for b, e in cells) + " |")
    print("\n(bits held per element of W, 256², r = 16; the bound is 4 for fp32, 2 for 16-bit)\n")
    for dtype in (torch.float32, torch.bfloat16):  # run.py's measurement: one merge in a fresh process each
        peak = common.peak_memory(dtype, args.n)
        mib = {k: f"{v / 2**20:.1f} MiB" if isinstance(v, int) else v for k, v in peak.items()}
        print(f"peak extra memory of one merge, {args.n}² {str(dtype).removeprefix('torch.')}: {mib}")
    print(f"\nMachine: {common.machine()}")


if __name__ == "__main__":
    main()
