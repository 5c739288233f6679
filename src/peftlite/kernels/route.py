"""Per-sample LoRA routing of a Linear layer's inference forward on the CPU: ``_route.c`` via ctypes.

Every row of the batch goes through its own adapter (``slots[n]``, or none for -1). The rows are sorted by
adapter (a stable argsort), so the C kernel reads each adapter's factors once per call, while they sit in
cache; the factors are passed to it by address, since stacking them into one tensor would cost as much as
the whole computation. The sorted rows are split into contiguous runs, one per thread
(``torch.get_num_threads()``) where the work is large enough to pay for a thread.

The library is built like ``_cpu``'s (``_cpu.build``: system compiler, cached per source and flags). Without
a compiler, with ``PEFTLITE_CPU_FUSED=0``, or for tensors it does not take, ``route_linear_`` returns False
and the caller runs torch ops instead.
"""

from __future__ import annotations

import ctypes
import functools
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from . import _cpu

SOURCE = Path(__file__).with_name("_route.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp-simd", "-ffp-contract=fast"]
MIN_WORK = 1 << 24  # multiply-adds per thread (~1 ms of one core) before a thread pays for its start (0.1 ms+)
_p, _i64 = ctypes.c_void_p, ctypes.c_int64


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled routing kernel, or None (logged) when it cannot be built or is turned off."""
    lib = _cpu.build(SOURCE, FLAGS, "per-sample routing uses torch ops")
    if lib is None:
        return None
    lib.pl_route.argtypes = [_i64, _i64, _i64, _p, _p, _p, _p, _i64, _p, _p, _p, _p]
    lib.pl_route.restype = _i64
    return lib


def route_linear_(y: Tensor, x: Tensor, slots: Tensor, A: Sequence[Tensor], B: Sequence[Tensor],
                  scales: Sequence[float]) -> bool:
    """``y[n] += scales[k]·(x[n] @ A[k].T) @ B[k].T`` for every row n with ``slots[n] = k >= 0``, in place.

    Rows with -1 are left untouched; the dims between N and the features (e.g. tokens) share the row's
    adapter. An inference forward: no autograd, and sums in another order than torch's (within fp32
    rounding of it), the same run to run and for any number of threads.

    Args:
        y: (N, ..., out) float32, contiguous, CPU; updated in place.
        x: (N, ..., in) float32, contiguous, CPU, with y's leading dims.
        slots: (N,) int64, CPU, each in [-1, len(A)).
        A: K tensors (r_k, in), float32, contiguous; ranks r_k >= 1 may differ per adapter.
        B: K tensors (out, r_k), float32, contiguous.
        scales: K floats.

    Returns:
        True when done; False, with y untouched, when the kernel cannot run (no C compiler,
        ``PEFTLITE_CPU_FUSED=0``, or a dtype, layout or device it does not take): run torch ops instead.

    Raises:
        ValueError: inconsistent shapes or counts (checked first, always), or a slot out of range
            (checked when the kernel runs, as it reads ``slots``).
        MemoryError: the kernel's scratch (r_max × out floats per thread) could not be allocated.
    """
    _check_batch(y, x, slots, A, B, scales)
    factors = _stacked(A, B, x.shape[-1], y.shape[-1])
    if factors is None or not _takes(y, x, slots) or (lib := library()) is None:
        return False
    if x.numel() == 0 or y.numel() == 0:  # no rows, no tokens, or nothing to add
        return True
    sorted_slots, rows = torch.sort(slots, stable=True)  # -1 rows first, then each adapter's rows in order
    if not _any_routed(sorted_slots, slots, len(A)):
        return True
    n, d_in, d_out = x.shape[0], x.shape[-1], y.shape[-1]
    tokens = x.numel() // (n * d_in)
    scale = array("f", [float(s) for s in scales])
    args = (factors.a.buffer_info()[0], factors.b.buffer_info()[0], factors.ranks.buffer_info()[0],
            scale.buffer_info()[0])

    def run(span: tuple[int, int]) -> int:
        start, stop = span
        return lib.pl_route(d_in, d_out, tokens, x.data_ptr(), y.data_ptr(), rows.data_ptr() + 8 * start,
                            sorted_slots.data_ptr() + 8 * start, stop - start, *args)

    spans = _spans(sorted_slots, torch.frombuffer(factors.ranks, dtype=torch.int64), tokens * (d_in + d_out))
    if any(code != 0 for code in _cpu.run_blocks(run, spans)):
        raise MemoryError(f"route_linear_: no memory for the kernel's scratch ({max(factors.ranks)} x {d_out} "
                          "floats per thread)")
    return True


class _Factors(NamedTuple):
    """What the kernel reads of the adapters: per adapter, its rank and the addresses of A and B."""

    ranks: array  # (K,) int64
    a: array  # (K,) int64 addresses
    b: array  # (K,) int64 addresses


def _stacked(A: Sequence[Tensor], B: Sequence[Tensor], d_in: int, d_out: int) -> _Factors | None:
    """The adapters' ranks and addresses, or None when a factor is not a contiguous float32 CPU tensor.

    Raises:
        ValueError: A[k] is not (r, d_in) or B[k] not (d_out, r), r >= 1.
    """
    ranks, a_ptr, b_ptr, takes = array("q"), array("q"), array("q"), True
    for k, (a, b) in enumerate(zip(A, B)):
        a_shape, b_shape = a.shape, b.shape
        if len(a_shape) != 2 or a_shape[0] < 1 or a_shape[1] != d_in or b_shape != (d_out, a_shape[0]):
            raise ValueError(f"route_linear_: adapter {k} has A {tuple(a_shape)} and B {tuple(b_shape)}; for x "
                             f"(..., {d_in}) and y (..., {d_out}) they must be (r, {d_in}) and ({d_out}, r), r >= 1")
        takes = takes and a.dtype is torch.float32 and b.dtype is torch.float32 and a.is_cpu and b.is_cpu \
            and a.is_contiguous() and b.is_contiguous()
        ranks.append(a_shape[0])
        a_ptr.append(a.data_ptr())
        b_ptr.append(b.data_ptr())
    return _Factors(ranks, a_ptr, b_ptr) if takes else None


def _any_routed(sorted_slots: Tensor, slots: Tensor, k: int) -> bool:
    """Does any row have an adapter? Raises ValueError, naming the first, for a slot outside [-1, k)."""
    lo, hi = sorted_slots[0].item(), sorted_slots[-1].item()
    if lo < -1 or hi >= k:
        bad = int(((slots < -1) | (slots >= k)).nonzero()[0])
        raise ValueError(f"route_linear_: slots[{bad}] = {int(slots[bad])} is out of range [-1, {k}) for {k} "
                         "adapters; use -1 for a row without an adapter")
    return hi >= 0


def _spans(sorted_slots: Tensor, ranks: Tensor, per_rank: int) -> list[tuple[int, int]]:
    """Contiguous runs of the sorted rows, one per thread, of about equal work (rank·per_rank each row);
    one run of all rows where the work cannot keep two threads busy for ``MIN_WORK`` each."""
    n = sorted_slots.shape[0]
    threads = min(torch.get_num_threads(), n)
    if threads <= 1 or n * int(ranks.max()) * per_rank < 2 * MIN_WORK:
        return [(0, n)]
    work = torch.where(sorted_slots < 0, 0, ranks[sorted_slots.clamp(min=0)]).cumsum(0)  # (n,)
    threads = max(1, min(threads, int(work[-1]) * per_rank // MIN_WORK))
    cuts = (torch.searchsorted(work, work[-1] * torch.arange(1, threads) // threads) + 1).tolist()  # after the row
    bounds = [0, *(min(c, n) for c in cuts), n]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _check_batch(y: Tensor, x: Tensor, slots: Tensor, A: Sequence[Tensor], B: Sequence[Tensor],
                 scales: Sequence[float]) -> None:
    if x.dim() < 2 or y.shape[:-1] != x.shape[:-1] or y.dim() != x.dim():
        raise ValueError(f"route_linear_: x {tuple(x.shape)} and y {tuple(y.shape)} must be (N, ..., in) and "
                         "(N, ..., out) with the same leading dims")
    if slots.shape != (x.shape[0],):
        raise ValueError(f"route_linear_: slots has shape {tuple(slots.shape)} but the batch has {x.shape[0]} "
                         f"rows; give one slot per row, ({x.shape[0]},)")
    if slots.is_floating_point() or slots.is_complex():
        raise ValueError(f"route_linear_: slots must hold integers (adapter numbers, -1 for none), got {slots.dtype}")
    if not len(A) == len(B) == len(scales):
        raise ValueError(f"route_linear_: {len(A)} A factors, {len(B)} B factors and {len(scales)} scales; "
                         "give one of each per adapter")


def _takes(y: Tensor, x: Tensor, slots: Tensor) -> bool:
    """Does the kernel take these: CPU, contiguous, float32 x and y, int64 slots?"""
    return x.dtype is torch.float32 and y.dtype is torch.float32 and slots.dtype is torch.int64 and x.is_cpu \
        and y.is_cpu and slots.is_cpu and x.is_contiguous() and y.is_contiguous() and slots.is_contiguous()
