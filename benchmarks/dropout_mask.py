"""Seeded dropout (``kernels.dropout``) on the CPU against ``F.dropout`` and one plain memory pass.

    PYTHONPATH=src python benchmarks/dropout_mask.py [--threads 1] [--repeats 9] [--sizes 2M 16M]

fp32, p = 0.1. Timed in one process, interleaved, medians of ``--repeats`` (>= 7), each sample the third of
three calls in a row (see ``timed``):

- ``F.dropout``: ``F.dropout(x, 0.1, True)`` (a Bernoulli draw per element, then a multiply);
- ``x * 2``: one pass that reads x and writes a fresh tensor, the floor for any out-of-place op;
- ``dropout (C)``: ``dropout(x, 0.1, seed)`` on the detected backend (the C kernel, where it builds);
- ``dropout (torch ops)``: the same on the torch-op backend (the fallback), into a fresh tensor;
- ``dropout_ (C)``: in place on a contiguous tensor (the backward's use, on a gradient);
- ``C into a kept buffer``: the C kernel writing into a tensor reused between calls: the kernel alone,
  without the first-touch page faults of a fresh output (which dominate at 16M elements, 64 MiB: glibc
  maps so large a block anew each time; torch's ``THP_MEM_ALLOC_ENABLE=1`` makes them cheaper).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from peftlite.kernels import dropout as D  # noqa: E402

P = 0.1


def machine() -> str:
    return f"{common.machine()}; THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"


def timed(fns: dict, repeats: int, warm: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, run round-robin (so background load hits them alike). Each sample
    times the call after ``warm`` calls of the same fn, so that each finds the allocator as its own last call
    left it (its freed output to reuse, where glibc keeps the block), not as another contender left it."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            for _ in range(warm):
                f()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def torch_ops(x: torch.Tensor, seed: int) -> torch.Tensor:
    out = torch.empty_like(x)
    D.BACKENDS["torch"](x, out, P, seed)
    return out


def figures(n: int, repeats: int) -> dict[str, float]:
    x = torch.randn(n)
    grad, kept = torch.randn(n), torch.empty(n)
    seed = D.new_seed()
    fns = {
        "F.dropout": lambda: F.dropout(x, P, True),
        "x * 2": lambda: x * 2,
        f"dropout ({D.backend_for(x)})": lambda: D.dropout(x, P, seed),
        "dropout (torch ops)": lambda: torch_ops(x, seed),
        f"dropout_ ({D.backend_for(x)})": lambda: D.dropout_(grad, P, seed),
    }
    if D.backend_for(x) == "c":
        fns["C into a kept buffer"] = lambda: D.BACKENDS["c"](x, kept, P, seed)
    return timed(fns, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--sizes", nargs="+", default=["2M", "16M"], help="element counts; a suffix M means 2^20")
    args = ap.parse_args()
    if args.repeats < 7:
        ap.error("--repeats must be at least 7")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    for size in args.sizes:
        n = int(size[:-1]) << 20 if size.upper().endswith("M") else int(size)
        t = figures(n, args.repeats)
        ours, base, floor = t[f"dropout ({D.backend_for(torch.empty(0))})"], t["F.dropout"], t["x * 2"]
        print(f"\n{size} fp32 elements ({4 * n / 2**20:.0f} MiB), p={P}, medians of {args.repeats}:")
        for name, s in t.items():
            print(f"  {name:<22} {1e3 * s:9.3f} ms   F.dropout / this = {base / s:6.2f}   this / (x * 2) = "
                  f"{s / floor:5.2f}")
        print(f"  -> our dropout is {base / ours:.1f}x faster than F.dropout and takes {ours / floor:.2f}x "
              "the time of x * 2")
    if load := getattr(os, "getloadavg", None):
        print(f"\n1-min load average at the end: {load()[0]:.1f}")


if __name__ == "__main__":
    main()
