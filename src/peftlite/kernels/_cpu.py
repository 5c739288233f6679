"""The fused CPU pass of the torch backend: ``_cpu.c`` built once with the system C compiler, via ctypes.

The torch-op implementation of the scheme runs a few dozen elementwise ops per block, each a pass over
memory; the C loop does the flag, the candidate run, the code and the escape of each element in one
pass. It implements the same scheme to the bit, so records are interchangeable and the tests compare
the two. Without a C compiler (or with ``PEFTLITE_CPU_FUSED=0``) the torch ops run instead, logged at
debug level. The library is cached per source and compiler under ``$PEFTLITE_CACHE`` (default
``~/.cache/peftlite``).
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
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("peftlite.kernels")
SOURCE = Path(__file__).with_name("_cpu.c")
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_p, _i64 = ctypes.c_void_p, ctypes.c_int64


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged) when they cannot be built or are turned off."""
    if os.environ.get("PEFTLITE_CPU_FUSED", "1") == "0":
        log.debug("peftlite kernels: PEFTLITE_CPU_FUSED=0; CPU merges use torch ops")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.debug("peftlite kernels: no C compiler found; CPU merges use torch ops (slower, same result)")
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + cc.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PEFTLITE_CACHE", Path.home() / ".cache" / "peftlite"))
    target = cache / f"cpu-{key}.so"
    try:
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / target.name
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent builders both end with a whole file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.debug("peftlite kernels: building %s failed (%s); CPU merges use torch ops", SOURCE.name, detail)
        return None
    lib.pl_merge.argtypes = [ctypes.c_int, _p, _p, _i64, _p, _p, _p, _p]
    lib.pl_merge.restype = _i64
    lib.pl_unmerge.argtypes = [ctypes.c_int, _p, _p, _i64, _p, _i64]
    lib.pl_unmerge.restype = None
    return lib


def usable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in KINDS and weight.is_contiguous() \
        and library() is not None


class Scratch:
    """Per-merge output buffers for one block of up to ``n`` elements (worst case: every element escapes)."""

    def __init__(self, n: int, dtype: torch.dtype):
        self.words = torch.empty(n + 2, dtype=torch.int32)
        self.esc_index = torch.empty(n, dtype=torch.int64)
        self.esc_values = torch.empty(n, dtype=dtype)
        self.out = torch.zeros(3, dtype=torch.int64)


def merge_block(blk: Tensor, d: Tensor, s: Scratch) -> tuple[int, Tensor, Tensor, Tensor, int]:
    """Merge one contiguous block in place.

    Returns:
        (overflow, codes, escape index within the block, escape values, flagged): ``overflow`` is the
        flat index of the first element that would become non-finite (the block is then restored
        exactly and the other outputs are empty), or -1.
    """
    n = blk.numel()
    bad = library().pl_merge(KINDS[blk.dtype], blk.data_ptr(), d.data_ptr(), n, s.words.data_ptr(),
                             s.esc_index.data_ptr(), s.esc_values.data_ptr(), s.out.data_ptr())
    if bad >= 0:
        return bad, s.words[:0], s.esc_index[:0], s.esc_values[:0], 0
    n_words, n_esc, n_flag = s.out.tolist()
    return -1, s.words[:n_words].clone(), s.esc_index[:n_esc].clone(), s.esc_values[:n_esc].clone(), n_flag


def unmerge_block(blk: Tensor, d: Tensor, words: Tensor) -> None:
    """Unmerge one contiguous block in place from its code words (the caller writes the escapes)."""
    words = words.contiguous()
    library().pl_unmerge(KINDS[blk.dtype], blk.data_ptr(), d.data_ptr(), blk.numel(), words.data_ptr(),
                         words.numel())
