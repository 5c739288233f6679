"""The fused CPU pass of the torch backend: ``_cpu.c`` built once with the system C compiler, via ctypes.

The torch-op implementation of the scheme runs a few dozen elementwise ops per block, each a pass over
memory; the C pass computes ΔW (in ``_torch.delta``'s order) and the window, the code and the escape of
each element in one pass over the block, and blocks run on all of torch's threads. It
implements the same scheme to the bit, so records are interchangeable and the tests compare the two.
Without a C compiler (or with ``PEFTLITE_CPU_FUSED=0``) the torch ops run instead, logged at debug level.
The library is built for the vector ISA torch detects (AVX-512 or AVX2, else the baseline) and cached per
source, compiler and flags under ``$PEFTLITE_CACHE`` (default ``~/.cache/peftlite``); ``build`` does the
same for the other C sources of this package (``_route.c``, see ``routing``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

log = logging.getLogger("peftlite.kernels")
SOURCE = Path(__file__).with_name("_cpu.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
ARCH = {"AVX512": "-march=x86-64-v4", "AVX2": "-march=x86-64-v3"}  # torch's CPU capability -> gcc/clang
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_p, _i64 = ctypes.c_void_p, ctypes.c_int64
T, R = TypeVar("T"), TypeVar("R")


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged) when they cannot be built or are turned off."""
    lib = build(SOURCE, FLAGS, "CPU merges use torch ops (slower, same result)")
    if lib is None:
        return None
    lib.pl_merge.argtypes = [ctypes.c_int, _p, _i64, _i64, _p, _i64, _p, _i64, ctypes.c_float, _p, _p, _i64, _p, _p,
                             _p, _p]
    lib.pl_merge.restype = _i64
    lib.pl_unmerge.argtypes = [ctypes.c_int, _p, _i64, _i64, _p, _i64, _p, _i64, ctypes.c_float, _p, _p, _i64, _p,
                               _i64]
    lib.pl_unmerge.restype = None
    return lib


def build(source: Path, flags: list[str], fallback: str) -> ctypes.CDLL | None:
    """``source`` built into a shared library with the system C compiler (``$CC``, else ``cc``/``gcc``), or
    None, logged at debug level with ``fallback`` (what runs instead), when it cannot be or is turned off.

    Built with ``flags`` plus the vector ISA torch detects on this CPU, else with ``flags`` alone, and
    cached per source, compiler and flags under ``$PEFTLITE_CACHE`` (``_cpu.c`` as ``cpu-<hash>.so``).
    ``PEFTLITE_CPU_FUSED=0`` turns every such library off. The caller declares the argument types.
    """
    if os.environ.get("PEFTLITE_CPU_FUSED", "1") == "0":
        log.debug("peftlite kernels: PEFTLITE_CPU_FUSED=0; %s", fallback)
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.debug("peftlite kernels: no C compiler found; %s", fallback)
        return None
    for flag_set in _flag_sets(flags):  # the vector ISA torch detected first, then the portable baseline
        lib = _build(cc, source, flag_set)
        if lib is not None:
            return lib
    log.debug("peftlite kernels: %s failed to build; %s", source.name, fallback)
    return None


def _flag_sets(flags: list[str]) -> list[list[str]]:
    """Compiler flags to try: with the vector ISA torch detected on this CPU (the loops are written to
    vectorise; in ``_cpu.c``, -ffp-contract=off keeps every result bit-identical to scalar code), then without."""
    arch = ARCH.get(torch.backends.cpu.get_cpu_capability())
    return [flags + [arch], flags] if arch else [flags]


def _build(cc: str, source: Path, flags: list[str]) -> ctypes.CDLL | None:
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources include
    key = hashlib.sha256(source.read_bytes() + headers + cc.encode() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PEFTLITE_CACHE", Path.home() / ".cache" / "peftlite"))
    target = cache / f"{source.stem.lstrip('_')}-{key}.so"
    try:
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / target.name
                subprocess.run([cc, *flags, str(source), "-o", str(out), "-lm"], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent builders both end with a whole file
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.debug("peftlite kernels: building %s failed with %s (%s)", source.name, " ".join(flags), detail)
        return None


def usable(weight: Tensor, factors: torch.dtype = torch.float32) -> bool:
    return weight.device.type == "cpu" and weight.dtype in KINDS and weight.is_contiguous() \
        and factors == torch.float32 and library() is not None


class Block(NamedTuple):
    """One merged block: ``overflow`` is the flat index of the first element that would have become
    non-finite (the block is then restored exactly and the rest is empty), or -1."""

    overflow: int
    codes: Tensor  # (words,) int32
    esc_index: Tensor  # (n,) int64, within the block
    esc_values: Tensor  # (n,) W's dtype
    flagged: int


def _address(gain: Tensor | None) -> int | None:
    """The gains' address for C (NULL for a plain merge); the caller's slice of a contiguous (rows,) tensor."""
    if gain is not None and not gain.is_contiguous():
        raise ValueError(f"the fused CPU pass needs contiguous gains, got strides {gain.stride()}")
    return None if gain is None else gain.data_ptr()


_scratch = threading.local()


def _work(rows: int, cols: int) -> tuple[Tensor, int]:
    """Room for the ΔW of a few rows (about 128 KiB, so it stays in L2), and how many rows that is.

    One buffer per thread, kept and grown as needed: allocated per block, the allocator's churn between it
    and the blocks' larger scratch raised a 4096² merge's peak RSS growth from 4.5 to 12 MiB.
    """
    n = max(1, min(rows, 32768 // max(cols, 1)))
    buf = getattr(_scratch, "work", None)
    if buf is None or buf.numel() < n * cols:
        _scratch.work = buf = torch.empty(n * cols, dtype=torch.float32)
    return buf, n


def _record_scratch(n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Room for one block's record at its worst (every element coded or escaped): code words, escape indices and
    values, and C's three counts. Kept per thread and grown as needed (only the pages a merge writes become
    resident); allocated per block, they cost a 4096² fp32 merge ~4 ms of mapping and unmapping."""
    kept = getattr(_scratch, "record", None)
    if kept is None or kept[0].numel() < n + 2 or kept[2].dtype != dtype:
        kept = (torch.empty(n + 2, dtype=torch.int32), torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=dtype),
                torch.zeros(3, dtype=torch.int64))
        _scratch.record = kept
    return kept


def _factors(rows: int, cols: int, A: Tensor | None, B_rows: Tensor | None, d: Tensor | None) -> tuple:
    """``(A, lda, B, r, work, work_rows)`` for C: the pair and a per-thread scratch, or (r = 0) the given ΔW."""
    if d is not None:
        if d.dtype != torch.float32 or not d.is_contiguous() or tuple(d.shape) != (rows, cols):
            raise ValueError(f"the fused CPU pass needs the block's ΔW as contiguous fp32 ({rows}, {cols}), got "
                             f"{d.dtype} {tuple(d.shape)}")
        return None, 0, None, 0, d.data_ptr(), rows
    work, work_rows = _work(rows, cols)
    return A.data_ptr(), A.stride(0), B_rows.data_ptr(), A.shape[0], work.data_ptr(), work_rows


def merge_block(blk: Tensor, A: Tensor | None, B_rows: Tensor | None, scale: float, gain: Tensor | None = None,
                d: Tensor | None = None) -> Block:
    """Merge ``scale·B_rows@A`` (see ``_torch.delta``) into the contiguous (rows, cols) block in place.

    A: (r, cols) fp32 with unit column stride (any row stride), B_rows: (rows, r) contiguous fp32. Or ``d``,
    the block's ΔW itself, already scaled (rows, cols) contiguous fp32 (A, B_rows and scale unused).
    gain: the block's (rows,) contiguous fp32 per-row gains (DoRA, see ``_gain``), or None.
    Rows with gain 0 get no codes: the caller keeps them.
    """
    rows, cols = blk.shape
    words, esc_index, esc_values, out = _record_scratch(blk.numel(), blk.dtype)
    a, lda, b, r, work, work_rows = _factors(rows, cols, A, B_rows, d)
    bad = library().pl_merge(KINDS[blk.dtype], blk.data_ptr(), rows, cols, a, lda, b, r, scale, _address(gain),
                             work, work_rows, words.data_ptr(), esc_index.data_ptr(), esc_values.data_ptr(),
                             out.data_ptr())
    if bad >= 0:
        return Block(bad, words[:0], esc_index[:0], esc_values[:0], 0)
    n_words, n_esc, n_flag = out.tolist()
    return Block(-1, words[:n_words].clone(), esc_index[:n_esc].clone(), esc_values[:n_esc].clone(), n_flag)


def unmerge_block(blk: Tensor, A: Tensor | None, B_rows: Tensor | None, scale: float, words: Tensor,
                  gain: Tensor | None = None, d: Tensor | None = None) -> None:
    """Unmerge one contiguous block in place from its code words (the caller writes the escapes, and the rows
    with gain 0). A and B_rows, or d, as for ``merge_block``."""
    rows, cols = blk.shape
    words = words.contiguous()
    a, lda, b, r, work, work_rows = _factors(rows, cols, A, B_rows, d)
    library().pl_unmerge(KINDS[blk.dtype], blk.data_ptr(), rows, cols, a, lda, b, r, scale, _address(gain), work,
                         work_rows, words.data_ptr(), words.numel())


_pools: dict[int, ThreadPoolExecutor] = {}  # threads -> a pool kept for the process
_pools_lock = threading.Lock()


def _forget_pools() -> None:
    """In a forked child (a DataLoader worker), which has none of its parent's threads: new pools, a new lock."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers kept for the process, so that their per-thread scratch (``_work``,
    ``_record_scratch``) is reused: with a pool per call, fresh threads mapped and faulted in fresh scratch on
    every merge (and every dropout mask)."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="peftlite")
        return pool


def run_blocks(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``torch.get_num_threads()`` threads (ctypes calls drop the GIL)."""
    threads = min(torch.get_num_threads(), len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    return list(_pool(threads).map(fn, items))
