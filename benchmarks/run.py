"""peftlite vs HF PEFT on the same work, in one process, interleaved, medians; writes docs/performance.md.

    PYTHONPATH=src python benchmarks/run.py [--quick] [--no-write]

Every figure runs its contenders round-robin (so background load hits them alike) and reports medians.
PEFT is optional (``pip install peft``, the ``bench`` extra); without it its columns read "n/a".
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from common import ROOT, machine, peak_memory, peft, peft_wrap, randomize_adapters, timed
from torch import nn

import peftlite

# ---- figures ---------------------------------------------------------------------------------

def linear_forward(repeats: int, n: int = 1024, d: int = 4096) -> dict:
    base = nn.Sequential(nn.Linear(d, d))
    x = torch.randn(n, d)
    ours = peftlite.wrap(copy.deepcopy(base), targets="0", rank=16)
    randomize_adapters(ours)
    fns = {"base": lambda: base(x), "ours": lambda: ours(x)}
    if peft:
        theirs = peft_wrap(copy.deepcopy(base), ["0"], 16)
        randomize_adapters(theirs)
        fns["peft"] = lambda: theirs(x)
    with torch.no_grad():
        return timed(fns, repeats)


def resnet(repeats: int, px: int, train: bool) -> dict:
    from torchvision.models import resnet50
    torch.manual_seed(0)
    base = resnet50()
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    ours = peftlite.wrap(copy.deepcopy(base), targets=nn.Conv2d, rank=8)
    randomize_adapters(ours)
    models = {"base": base, "ours": ours}
    if train:
        full = copy.deepcopy(base)
        models["full"] = full
        for p in base.parameters():
            p.requires_grad_(False)
    if peft:
        theirs = peft_wrap(copy.deepcopy(base), convs, 8)
        randomize_adapters(theirs)
        models["peft"] = theirs
    x = torch.randn(8, 3, px, px)
    if not train:
        for m in models.values():
            m.eval()
        with torch.no_grad():
            return timed({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats)

    def step(m, needs_input_grad):
        xi = x.clone().requires_grad_(needs_input_grad)
        m(xi).square().mean().backward()
        m.zero_grad(set_to_none=True)

    for m in models.values():
        m.train()
    return timed({k: (lambda m=m, k=k: step(m, k == "base")) for k, m in models.items()}, repeats)


def skeleton(device="meta") -> nn.Module:
    """A 7B-shaped decoder skeleton: 32 blocks of q, k, v, o, gate, up, down (224 Linear)."""
    d, f = 4096, 11008
    with torch.device(device):
        blocks = nn.ModuleList()
        for _ in range(32):
            blk = nn.Module()
            for name in ("q", "k", "v", "o"):
                setattr(blk, name, nn.Linear(d, d, bias=False))
            blk.gate, blk.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
            blk.down = nn.Linear(f, d, bias=False)
            blocks.append(blk)
        return nn.Sequential(blocks)


def wrap_figure(repeats: int) -> dict:
    names = ["q", "k", "v", "o", "gate", "up", "down"]
    fns = {"ours": lambda: peftlite.wrap(skeleton(), targets=nn.Linear, rank=16),
           "skeleton": lambda: skeleton()}
    if peft:
        fns["peft"] = lambda: peft_wrap(skeleton(), names, 16)
    t = timed(fns, repeats)
    return {k: v - t["skeleton"] for k, v in t.items() if k != "skeleton"}  # wrapping only


def fmt_ms(s) -> str:
    return f"{1e3 * s:.1f} ms" if isinstance(s, float) else "n/a"


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b > 0 else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    n = 1024 if args.quick else 4096
    rows = []

    def row(figure, ours, peft_value, goal, met):
        rows.append((figure, ours, peft_value, goal, "yes" if met is True else "no" if met is False else "—"))
        print(f"| {' | '.join(rows[-1])} |", flush=True)

    print("| figure | peftlite | PEFT | goal | met |\n|---|---|---|---|---|")
    import merge_codec  # benchmarks/merge_codec.py: the exact merge beside PEFT, addmm_ and an integer floor

    for dtype in merge_codec.DTYPES:
        fns, exact = merge_codec.contenders(dtype, n)
        m = timed(fns, reps)
        goal = 1.25 if dtype == torch.float32 else 4.0
        speed = m["peft"] / m["peftlite"] if "peft" in m else None
        row(f"merge+unmerge {n}² Linear r=16 {str(dtype)[6:]} (exact: {exact}; `addmm_` pair {fmt_ms(m['addmm_'])}, "
            f"two integer passes {fmt_ms(m['floor'])})",
            f"{fmt_ms(m['peftlite'])} ({m['peftlite'] / m['addmm_']:.1f}× `addmm_`)", fmt_ms(m.get("peft")),
            f"≥ {goal:g}× PEFT's speed and ≤ 2.5× `addmm_`" + (f"; is {speed:.2f}×" if speed else ""),
            speed >= goal and m["peftlite"] <= 2.5 * m["addmm_"] if speed else None)
    f = linear_forward(reps, n=256 if args.quick else 1024)
    row("unmerged Linear forward N=1024 d=4096 r=16, ÷ base", ratio(f["ours"], f["base"]),
        ratio(f.get("peft"), f["base"]), "≤ 1.03", f["ours"] / f["base"] <= 1.03)
    px_inf, px_train = (64, 64) if args.quick else (160, 128)
    r = resnet(reps, px_inf, train=False)
    row(f"ResNet-50 inference b8 {px_inf}px, every Conv2d r=8, ÷ base", ratio(r["ours"], r["base"]),
        ratio(r.get("peft"), r["base"]), "≤ 1.10", r["ours"] / r["base"] <= 1.10)
    t = resnet(max(3, reps - 2), px_train, train=True)
    row(f"ResNet-50 training step b8 {px_train}px, ÷ frozen-base step", ratio(t["ours"], t["base"]),
        ratio(t.get("peft"), t["base"]), "≤ 1.15", t["ours"] / t["base"] <= 1.15)
    row(f"ResNet-50 training step b8 {px_train}px, ÷ full fine-tune step (frozen base: "
        f"{ratio(t['base'], t['full'])})", ratio(t["ours"], t["full"]), ratio(t.get("peft"), t["full"]),
        "≤ 0.80", t["ours"] / t["full"] <= 0.80)
    w = wrap_figure(reps)
    row("wrap of a 7B-shaped skeleton on meta (224 Linear)", fmt_ms(w["ours"]), fmt_ms(w.get("peft")),
        "≤ 50 ms", w["ours"] <= 0.050)
    import dora  # benchmarks/dora.py
    import mixed  # benchmarks/mixed.py: every row of a batch its own adapter, inference

    d = dora.forward(reps)
    row("DoRA unmerged Linear forward N=1024 d=4096 r=16, ÷ base (norms reused; with fresh norms: "
        f"{ratio(d['fresh'], d['base'])})", ratio(d["ours"], d["base"]), ratio(d.get("peft"), d["base"]), "≤ 1.10",
        d["ours"] / d["base"] <= 1.10)
    raw = dora.step_memory()
    mem = {k: f"{v / 2**20:.1f} MiB" for k, v in raw.items()}
    row(f"DoRA training step, bytes saved for backward (plain LoRA: {mem['lora']})", mem["dora"],
        mem.get("peft-dora", "n/a"), "≤ LoRA's + r-sized terms", raw["dora"] - raw["lora"] <= 1024 * 16 * 4 * 4)

    for K in (4, 16, 64):
        t = mixed.linear_case(K, 3 * reps)
        ours, theirs = t["ours"] - t["base"], t.get("peft", float("nan")) - t["base"]
        row(f"mixed batch, 2 × Linear 1024 r=16, batch 64, {K} adapters: time added over the base "
            f"({fmt_ms(t['base'])}); ÷ PEFT's", f"{fmt_ms(ours)} ({ratio(ours, theirs)})", fmt_ms(theirs),
            "≤ 1/3 of PEFT's" if K > 4 else "—", ours <= theirs / 3 if K > 4 and peft else None)
    for K in (4, 16, 64):
        t = mixed.resnet_case(K, max(3, reps - 4))
        ours, theirs = t["ours"] - t["base"], t.get("peft", float("nan")) - t["base"]
        row(f"mixed batch, ResNet-50 every Conv2d r=8, batch 16 96px, {K} adapters: time added over the base "
            f"({fmt_ms(t['base'])}); throughput ÷ PEFT's", f"{fmt_ms(ours)} ({ratio(t.get('peft'), t['ours'])})",
            fmt_ms(theirs), "reported", None)
    for dtype in (torch.float32, torch.bfloat16):
        pk = peak_memory(dtype, n)
        wbytes = n * n * (4 if dtype == torch.float32 else 2)
        show = lambda v, wb=wbytes: (f"{v / 2**20:.1f} MiB ({v / wb:.1%} of W)"
                                     if isinstance(v, int) else str(v))
        row(f"peak extra memory of merge, {n}² {str(dtype)[6:]} (RSS high-water growth)", show(pk["ours"]),
            show(pk.get("peft", "n/a")), "≈ 0 beyond the unmerge code", None)
    text = "\n".join(["| figure | peftlite | PEFT | goal | met |", "|---|---|---|---|---|"]
                     + [f"| {' | '.join(r)} |" for r in rows])
    flags = (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads else "")
    header = f"Measured by `python benchmarks/run.py{flags}` on: {machine()}."
    print("\n" + header)
    if not args.no_write:
        doc = ROOT / "docs" / "performance.md"
        old = doc.read_text() if doc.exists() else ""
        start, end = "<!-- run.py:begin -->", "<!-- run.py:end -->"
        block = f"{start}\n{header}\n\n{text}\n{end}"
        if start in old and end in old:
            new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
        else:
            new = "# Performance\n\n" + block + "\n" + old
        doc.write_text(new)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
