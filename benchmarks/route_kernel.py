"""Per-sample routing on the CPU: the C kernel (``kernels.route``) against a torch loop over the adapters.

    PYTHONPATH=src python benchmarks/route_kernel.py [--threads 1] [--repeats 200] [--cold]

Two Linear layers (d=1024), batch 64, r=16, K adapters, a random route (fixed seed; no -1 rows). Timed in
one process, interleaved, medians: the base layers alone, base + ``route_linear_`` per layer, and base +
the torch loop HF PEFT runs for a mixed batch (per adapter in the batch: ``sub = x[idx]``,
``y[idx] += scale·(sub @ Aᵀ) @ Bᵀ``). Prints the milliseconds each adds over the base.

``--cold`` times one ``route_linear_`` call of one layer instead, right after writing 64 MiB elsewhere
(the factors then come from memory, as inside a model whose base layers evict them), and again at once
(from cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from peftlite.kernels.route import library, route_linear_  # noqa: E402

D, RANK, BATCH = 1024, 16, 64


def loop_delta_(y: torch.Tensor, x: torch.Tensor, slots: list[int], A: list, B: list, scales: list) -> None:
    """HF PEFT's mixed-batch path: one sub-batch per adapter present, gathered and scattered back."""
    for k in sorted(set(slots)):
        idx = [n for n, s in enumerate(slots) if s == k]
        sub = x[idx]
        y[idx] += scales[k] * (sub @ A[k].T) @ B[k].T


def case(K: int, repeats: int) -> tuple[dict[str, float], float]:
    """Median seconds of base, kernel and loop for K adapters, and the kernel's max difference from the loop."""
    g = torch.Generator().manual_seed(K)
    layers = [nn.Linear(D, D) for _ in range(2)]
    factors = [([torch.randn(RANK, D, generator=g) / D**0.5 for _ in range(K)],
                [torch.randn(D, RANK, generator=g) / RANK**0.5 for _ in range(K)]) for _ in layers]
    scales = [2.0] * K
    slots = torch.randint(0, K, (BATCH,), generator=g)
    route = slots.tolist()
    x = torch.randn(BATCH, D, generator=g)

    def base():
        return layers[1](layers[0](x))

    def kernel():
        h = x
        for layer, (A, B) in zip(layers, factors):
            y = layer(h)
            assert route_linear_(y, h, slots, A, B, scales)
            h = y
        return h

    def loop():
        h = x
        for layer, (A, B) in zip(layers, factors):
            y = layer(h)
            loop_delta_(y, h, route, A, B, scales)
            h = y
        return h

    with torch.inference_mode():
        error = (kernel() - loop()).abs().max().item()
        return common.timed({"base": base, "kernel": kernel, "loop": loop}, repeats), error


def cold_and_warm(K: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one layer's ``route_linear_`` call with the factors evicted from cache, and cached."""
    g = torch.Generator().manual_seed(K)
    A = [torch.randn(RANK, D, generator=g) / D**0.5 for _ in range(K)]
    B = [torch.randn(D, RANK, generator=g) / RANK**0.5 for _ in range(K)]
    slots, x, y = torch.randint(0, K, (BATCH,), generator=g), torch.randn(BATCH, D, generator=g), torch.zeros(BATCH, D)
    scales, junk = [2.0] * K, torch.zeros(16 << 20)  # 64 MiB, more than the last-level cache of one core's share
    call = lambda: route_linear_(y, x, slots, A, B, scales)  # noqa: E731
    cold, warm = [], []
    with torch.inference_mode():
        call()
        for _ in range(repeats):
            junk.add_(1.0)
            for times in (cold, warm):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--cold", action="store_true", help="one layer's call, factors evicted from cache, and cached")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if library() is None:
        raise SystemExit("the routing kernel could not be built (no C compiler?)")
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; added ms over the base\n")
    if args.cold:
        print("| K | one layer, factors from memory | from cache |\n|---|---|---|")
        for K in (16, 64):
            cold, warm = cold_and_warm(K, args.repeats)
            print(f"| {K} | {1e3 * cold:.3f} ms | {1e3 * warm:.3f} ms |")
        return
    print("| K | base | kernel | torch loop | kernel max difference from loop |\n|---|---|---|---|---|")
    for K in (4, 16, 64):
        t, error = case(K, args.repeats)
        print(f"| {K} | {1e3 * t['base']:.2f} ms | +{1e3 * (t['kernel'] - t['base']):.2f} ms "
              f"| +{1e3 * (t['loop'] - t['base']):.2f} ms | {error:.1e} |")


if __name__ == "__main__":
    main()
