"""One short CUDA report (< 5 min on an H100/H200): merge bandwidth, merge memory, forward ratios, CUDA tests.

    PYTHONPATH=src python benchmarks/gpu.py

Merge bandwidth counts one read and one write of W per merge (what any in-place merge must move), and
is given as a % of the copy bandwidth measured here (``dst.copy_(src)``), the practical ceiling.
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import peftlite
from peftlite.kernels import _triton

try:
    import peft
except ImportError:
    peft = None

ROOT = Path(__file__).resolve().parents[1]


def cuda_time(fn, repeats=20, warmup=3) -> float:
    """Median seconds per call, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src))


def problem(n, dtype, ratio=0.05, r=16):
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(n, n, device="cuda", generator=g).to(dtype)
    A = torch.randn(r, n, device="cuda", generator=g)
    B = torch.randn(n, r, device="cuda", generator=g)
    return W, A, B, ratio / float((B @ A).std())


def merge_row(dtype: torch.dtype, ceiling: float, n: int = 8192) -> str:
    W, A, B, scale = problem(n, dtype)
    W0 = W.clone()
    times_m, times_u = [], []
    for _ in range(12):
        s0, s1, s2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        s0.record()
        rec = _triton.merge_(W, A, B, scale)
        s1.record()
        _triton.unmerge_(W, A, B, scale, rec)
        s2.record()
        s2.synchronize()
        times_m.append(s0.elapsed_time(s1) / 1e3)
        times_u.append(s1.elapsed_time(s2) / 1e3)
    t_merge, t_unmerge = statistics.median(times_m[2:]), statistics.median(times_u[2:])
    exact = torch.equal(W.view(torch.uint8), W0.view(torch.uint8))
    Bd, Ad = B.to(dtype), A.to(dtype)
    t_addmm = cuda_time(lambda: W.addmm_(Bd, Ad, alpha=scale))
    W.copy_(W0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rec = _triton.merge_(W, A, B, scale)
    peak = torch.cuda.max_memory_allocated() - base
    _triton.unmerge_(W, A, B, scale, rec)
    t_peft = "n/a"
    if peft:
        model = nn.Sequential(nn.Linear(n, n, bias=False)).to("cuda", dtype)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules=["0"]))
        pm.base_model.model[0].lora_B["default"].weight.data.normal_(0, 0.01)
        t_cycle = cuda_time(lambda: (pm.merge_adapter(), pm.unmerge_adapter()), repeats=5)
        t_peft = f"{1e3 * t_cycle / 2:.2f} ms (merge+unmerge ÷ 2)"
    wbytes = W.numel() * W.element_size()
    return (f"| {n}² {str(dtype)[6:]} (exact: {exact}) | {1e3 * t_merge:.2f} ms | {1e3 * t_unmerge:.2f} ms | "
            f"{100 * 2 * wbytes / t_merge / ceiling:.0f}% | {1e3 * t_addmm:.2f} ms "
            f"({100 * 2 * wbytes / t_addmm / ceiling:.0f}%) | {t_peft} | {8 * rec.nbytes / W.numel():.3f} | "
            f"{peak / 2**20:.1f} MiB ({peak / wbytes:.1%} of W; held {rec.nbytes / 2**20:.2f} MiB) |")


def tile_sweep(ceiling: float, n: int = 8192) -> None:
    """bf16 merge at a few tile shapes (each merges and unmerges with its own, so records stay consistent)."""
    saved = _triton.BM, _triton.BN, _triton.WARPS
    print("\n| tile (BM×BN, warps), bf16 | merge | % of copy bw | unmerge | exact |\n|---|---|---|---|---|")
    W, A, B, scale = problem(n, torch.bfloat16)
    W0 = W.clone()
    for bm, bn, warps in ((32, 128, 8), (32, 64, 4), (64, 128, 8), (16, 256, 8), (32, 256, 16)):
        _triton.BM, _triton.BN, _triton.WARPS = bm, bn, warps
        rec = _triton.merge_(W, A, B, scale)
        _triton.unmerge_(W, A, B, scale, rec)
        t_m = cuda_time(lambda: _triton.unmerge_(W, A, B, scale, _triton.merge_(W, A, B, scale)),
                        repeats=5, warmup=1)
        rec = _triton.merge_(W, A, B, scale)
        t_u = cuda_time(lambda rec=rec: _triton.unmerge_(W, A, B, scale, rec), repeats=1, warmup=0)
        exact = torch.equal(W.view(torch.uint8), W0.view(torch.uint8))
        W.copy_(W0)
        print(f"| {bm}×{bn}, {warps} | {1e3 * (t_m - t_u):.2f} ms (cycle {1e3 * t_m:.2f}) | "
              f"{100 * 2 * W.numel() * 2 / max(t_m - t_u, 1e-9) / ceiling:.0f}% | {1e3 * t_u:.2f} ms | {exact} |",
              flush=True)
    _triton.BM, _triton.BN, _triton.WARPS = saved


def merge_report(ceiling: float) -> None:
    print("\n| W | peftlite merge | peftlite unmerge | % of copy bw (merge) | addmm_ | PEFT merge | "
          "held bits/el | max_memory_allocated during merge |\n|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        print(merge_row(dtype, ceiling), flush=True)
        torch.cuda.empty_cache()


def forward_report() -> None:
    d, r = 4096, 16
    base = nn.Sequential(nn.Linear(d, d)).to("cuda", torch.bfloat16)
    ours = peftlite.wrap(copy.deepcopy(base), targets="0", rank=r)
    nn.init.normal_(ours[0].lora.default.B, std=0.01)
    models = {"base": base, "peftlite": ours}
    if peft:
        cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"])
        models["PEFT"] = peft.get_peft_model(copy.deepcopy(base), cfg)
    print("\n| N (bf16, d=4096, r=16) | base | peftlite ÷ base | PEFT ÷ base |\n|---|---|---|---|")
    with torch.no_grad():
        for n in (1, 8, 64, 512, 2048, 8192):
            x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
            t = {k: cuda_time(lambda m=m, x=x: m(x)) for k, m in models.items()}
            peft_ratio = f"{t['PEFT'] / t['base']:.2f}" if "PEFT" in t else "n/a"
            ours = t["peftlite"] / t["base"]
            print(f"| {n} | {1e6 * t['base']:.1f} µs | {ours:.2f} | {peft_ratio} |", flush=True)


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    import triton
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
          f"triton {triton.__version__}, PEFT {peft.__version__ if peft else 'not installed'}")
    ceiling = copy_bandwidth()
    print(f"copy bandwidth (dst.copy_(src), 1 GiB): {ceiling / 1e9:.0f} GB/s (read + write)")
    merge_report(ceiling)
    if "--sweep" in sys.argv:
        tile_sweep(ceiling)
    forward_report()
    if "--no-tests" in sys.argv:
        return
    print("\nCUDA tests:", flush=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
           str(ROOT / "tests" / "test_kernels.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    print(proc.stdout[-3000:], proc.stderr[-2000:])


if __name__ == "__main__":
    main()
