"""Exact merge/unmerge cycles of one 4096² weight on the CPU kernels, for timing and for profilers.

    PYTHONPATH=src python benchmarks/merge_cycles.py [float32|bfloat16|float16] [--threads N] [--cycles N]

Prints the median merge and unmerge times, the flagged fraction and the bits held per element, and checks
that every cycle restores W bit-exactly. Under ``perf record`` (build the C pass with ``CC`` set to a
wrapper that adds ``-g`` to get source lines), it shows where the fused pass spends its time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peftlite.kernels import _torch

RATIO = 0.05  # std(scale·ΔW) / std(W), as benchmarks/run.py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dtype", nargs="?", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cycles", type=int, default=9)
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(args.n, args.n, generator=g).to(getattr(torch, args.dtype))
    A, B = torch.randn(16, args.n, generator=g), torch.randn(args.n, 16, generator=g)
    scale = RATIO * float(W.float().std()) / float((B @ A).std())
    W0 = W.clone()
    merge, unmerge = [], []
    for _ in range(args.cycles):
        t = time.perf_counter()
        rec = _torch.merge_(W, A, B, scale)
        merge.append(time.perf_counter() - t)
        t = time.perf_counter()
        _torch.unmerge_(W, A, B, scale, rec)
        unmerge.append(time.perf_counter() - t)
        assert torch.equal(W.view(torch.uint8), W0.view(torch.uint8)), "unmerge was not bit-exact"
    print(f"{args.dtype} {args.n}² r=16, {args.threads} thread(s): merge {1e3 * statistics.median(merge):.1f} ms, "
          f"unmerge {1e3 * statistics.median(unmerge):.1f} ms; flagged {rec.flagged / W.numel():.1%}, "
          f"held {rec.bits_per_element:.3f} bits/element, exact over {args.cycles} cycles")


if __name__ == "__main__":
    main()
