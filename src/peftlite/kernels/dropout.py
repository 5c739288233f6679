"""Seeded, regenerable dropout: a counter-based mask, so backward regenerates it from one 64-bit seed.

A layer draws ``seed = new_seed()`` per call and applies ``dropout(x, p, seed)``; its backward applies
``dropout_(grad, p, seed)``, which drops the same elements. Nothing mask-sized is kept between the two.

The mask, which every backend implements to the bit (``keep_mask`` is its oracle, in plain torch ops).
Element i (its flat index in x's contiguous, row-major order) of a call with seed s (an int, taken mod 2^64)
is dropped iff ``hash(s, i) < threshold(p)``, all arithmetic on unsigned integers::

    fmix32(h)     = MurmurHash3's 32-bit finalizer, mod 2^32:
                    h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
    k1, k2        = the low and high 32 bits of splitmix64's output number (i >> 32) + 1 from state s, mod 2^64:
                    z = s + ((i >> 32) + 1)·0x9E3779B97F4A7C15
                    z = (z ^ (z >> 30))·0xBF58476D1CE4E5B9;  z = (z ^ (z >> 27))·0x94D049BB133111EB;  z ^= z >> 31
    hash(s, i)    = fmix32(fmix32((i mod 2^32) ^ k1) ^ k2)
    threshold(p)  = min(round(p·2^32), 2^32 - 1)   (half to even)   so P(drop) = p to within 2^-32

All 64 bits of the seed enter the keys (for a given i >> 32, distinct seeds give distinct keys), and the
index's high 32 bits through them; the keys are computed on the host once per 2^32 elements, leaving two
finalizer rounds per element (4 multiplies in uint32, which vectorise).

The values: a kept element is ``x·scale`` with ``scale = 1/(1-p)``. For fp32, bf16 and fp16 the product is
``fp32(x)·fp32(scale)`` in fp32 (``fp32(scale)``: 1/(1-p) in double on the host, rounded once to fp32), rounded
once to x's dtype, to nearest-even; fp64 multiplies in fp64. A dropped element is +0 (also where x is
negative, infinite or NaN). Every bit is identical across backends, except that a kept NaN's payload in bf16
and fp16 follows the backend's conversion (torch's own CPU casts differ there between scalar and vector code).

Backends, per tensor (``backend_for``), detected once per device type:

    ========  =====================================================================================
    "c"       CPU tensors: ``_dropout.c`` built by ``_cpu.build`` (off with ``PEFTLITE_CPU_FUSED=0``),
              one vectorised pass, spans of elements on torch's threads
    "triton"  CUDA tensors, when Triton imports (``_triton_dropout``); CPU tensors only with
              ``PEFTLITE_KERNELS=triton`` and ``TRITON_INTERPRET=1``
    "torch"   otherwise: torch ops, in chunks (the oracle's code; on a CPU about 40 passes over int64
              chunks in cache, a few times slower than ``F.dropout``)
    ========  =====================================================================================

``PEFTLITE_KERNELS=torch`` keeps CUDA tensors off Triton (the C kernel follows ``PEFTLITE_CPU_FUSED``, as the
fused merge pass does); a fallback is logged once, at debug level, or as a warning when Triton was asked for.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import numbers
import operator
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import _cpu
from ._backend import _requested

log = logging.getLogger("peftlite.kernels")
SOURCE = Path(__file__).with_name("_dropout.c")
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
M32, M64 = (1 << 32) - 1, (1 << 64) - 1
SEGMENT = 1 << 32  # elements sharing the high 32 bits of their index, hence their keys
CPU_CHUNK, CHUNK = 1 << 18, 1 << 22  # elements per step of the torch ops (divisors of SEGMENT), on CPU / elsewhere
MIN_SPAN = 1 << 21  # elements per thread (~0.5 ms) before another thread pays for its start


def new_seed() -> int:
    """A uniform 64-bit seed from torch's default CPU generator: ``torch.manual_seed`` reproduces it, and
    ``torch.utils.checkpoint``'s RNG replay draws the same one again. Never touches a GPU."""
    return int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), None)) & M64


def keep_mask(shape: tuple[int, ...] | torch.Size, seed: int, p: float, device: torch.device | str) -> Tensor:
    """The mask by definition (module docstring), in plain torch ops: True where an element is kept.

    Returns:
        (*shape) bool on ``device``, element i of the row-major flattening for flat index i.
    """
    threshold = _threshold(p, "keep_mask")
    seed = _seed(seed, "keep_mask")
    keep = torch.empty(math.prod(shape), dtype=torch.bool, device=device)
    for start, stop in _chunks(keep.numel(), keep.device):
        keep[start:stop] = _keep_span(start, stop, seed, threshold, keep.device)
    return keep.view(shape)


@torch.no_grad()
def dropout(x: Tensor, p: float, seed: int, *, offset: int = 0) -> Tensor:
    """``x * keep / (1 - p)`` (see the module docstring for the exact values), as a new contiguous tensor.

    x is read as if ``x.contiguous()``, whatever its strides. No autograd: the result has no history (call it
    from an ``autograd.Function``).

    Args:
        x: (*) float32, bfloat16, float16 or float64, any device.
        p: the probability of dropping an element, in [0, 1). At p == 0, x itself is returned.
        seed: the mask's seed (``new_seed()``).
        offset: x's first element takes the mask of flat index ``offset``: ``dropout(t.view(-1)[k:k + n], p,
            seed, offset=k)`` is ``dropout(t, p, seed).view(-1)[k:k + n]``, so a big tensor can be dropped
            a slice at a time (a batch's samples, a matrix's rows) with the mask of the whole.
    Returns:
        (*) x's dtype and device, contiguous.
    Raises:
        ValueError: p outside [0, 1), or a dtype other than those above.
        TypeError: a seed that is not an int.
    """
    _threshold(p, "dropout")
    seed = _seed(seed, "dropout")
    offset = _offset(offset, "dropout")
    _check_dtype(x, "dropout")
    if p == 0:
        return x
    if x.is_contiguous():
        src, out = x, torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        src = out = x.contiguous()  # a fresh copy, dropped out in place
    BACKENDS[backend_for(x)](src, out, float(p), seed, offset)
    return out


# The layers drop their input a slice of samples (rows) at a time, each formed and used while it is in cache: on
# CPU an input-sized temporary per layer and step costs more in fresh pages than the mask itself
# (benchmarks/dropout_mask.py).
SLICE_BYTES = 1 << 20


def slices(x: Tensor) -> list[tuple[slice, int]]:
    """x's slices along dim 0 of about ``SLICE_BYTES``, each with the flat offset of its first element in
    ``x.contiguous()``'s order: ``dropout(x[s], p, seed, offset=o)`` drops a slice with the mask of the whole x."""
    n, per = x.shape[0], x[0].numel() if x.shape[0] else 0
    step = max(1, SLICE_BYTES // max(1, per * x.element_size()))
    return [(slice(i, min(n, i + step)), i * per) for i in range(0, n, step)]


@torch.no_grad()
def dropout_(t: Tensor, p: float, seed: int, *, offset: int = 0) -> Tensor:
    """``dropout`` in place on the contiguous ``t`` (a gradient in backward: the same elements drop); returns t.
    ``offset`` as for ``dropout``.

    Raises:
        ValueError: p outside [0, 1), a dtype ``dropout`` does not take, or a non-contiguous t.
    """
    _threshold(p, "dropout_")
    seed = _seed(seed, "dropout_")
    offset = _offset(offset, "dropout_")
    _check_dtype(t, "dropout_")
    if not t.is_contiguous():
        raise ValueError(f"dropout_: t must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}; "
                         "use dropout(t, p, seed), which returns a new contiguous tensor")
    if p != 0:
        BACKENDS[backend_for(t)](t, t, float(p), seed, offset)
    return t


def backend_for(t: Tensor) -> str:
    """The backend that drops out ``t``: "c", "triton" or "torch" (module docstring)."""
    want = _requested(os.environ.get("PEFTLITE_KERNELS"))
    if want == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if (t.is_cuda or (interpret and t.device.type == "cpu")) and _triton_module() is not None:
            return "triton"
        _warn_once(t.device.type)
    elif want == "torch" and t.is_cuda:
        return "torch"
    return _detected(t.device.type)


# ---- the definition's pieces -------------------------------------------------------------------

def _threshold(p: float, fn: str) -> int:
    """Raises ValueError for p outside [0, 1) (NaN included)."""
    if not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{fn}: p={p!r} is outside [0, 1); p is the probability of dropping an element")
    return min(round(float(p) * SEGMENT), M32)


def _seed(seed: int, fn: str) -> int:
    try:
        return operator.index(seed) & M64
    except TypeError:
        raise TypeError(f"{fn}: seed must be an int (from new_seed()), got {seed!r}") from None


def _offset(offset: int, fn: str) -> int:
    try:
        offset = operator.index(offset)
    except TypeError:
        raise TypeError(f"{fn}: offset must be an int (a flat index), got {offset!r}") from None
    if offset < 0:
        raise ValueError(f"{fn}: offset={offset} is negative; it is the flat index of the first element")
    return offset


def _keys(seed: int, segment: int) -> tuple[int, int]:
    """(k1, k2) of the 2^32 elements whose index has high bits ``segment``: splitmix64 output segment + 1."""
    z = (seed + (segment + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z & M32, z >> 32


def _scales(p: float) -> tuple[float, float]:
    """(fp32(1/(1-p)), 1/(1-p)): the scale of fp32/bf16/fp16 values, and of fp64 values."""
    scale = 1.0 / (1.0 - p)
    return struct.unpack("f", struct.pack("f", scale))[0], scale


def _mul_(h: Tensor, c: int, tmp: Tensor) -> Tensor:
    """h = (h·c) mod 2^32 in place, for int64 h in [0, 2^32): in 16-bit halves of c, so no product leaves int64."""
    torch.mul(h, c >> 16, out=tmp).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return h.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(M32)


def _fmix32_(h: Tensor, tmp: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer in place on int64 h in [0, 2^32); tmp: scratch of h's shape."""
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))
    _mul_(h, 0x85EBCA6B, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 13, out=tmp))
    _mul_(h, 0xC2B2AE35, tmp)
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))


def _keep_span(start: int, stop: int, seed: int, threshold: int, device: torch.device) -> Tensor:
    """The mask of flat indices [start, stop), a span within one segment: (stop - start,) bool."""
    k1, k2 = _keys(seed, start >> 32)
    h = torch.arange(start & M32, (start & M32) + (stop - start), dtype=torch.int64, device=device)
    tmp = torch.empty_like(h)
    _fmix32_(h.bitwise_xor_(k1), tmp)
    return _fmix32_(h.bitwise_xor_(k2), tmp) >= threshold


def _chunks(n: int, device: torch.device, offset: int = 0) -> list[tuple[int, int]]:
    """The flat indices [offset, offset + n) in steps of the torch ops, cut at multiples of the step (so never
    across a segment): CPU_CHUNK elements on the CPU (their int64 temporaries stay in cache), CHUNK elsewhere
    (fewer launches)."""
    step = CPU_CHUNK if device.type == "cpu" else CHUNK
    end = offset + n
    cuts = range((offset // step + 1) * step, end, step)
    bounds = [offset, *cuts, end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# ---- backends: each writes the dropout of the contiguous src into dst (src itself, or not overlapping) ----

def _torch_ops(src: Tensor, dst: Tensor, p: float, seed: int, offset: int = 0) -> None:
    threshold, (scale32, scale64) = _threshold(p, "dropout"), _scales(p)
    x, y = src.view(-1), dst.view(-1)
    for start, stop in _chunks(x.numel(), x.device, offset):
        v = x[start - offset:stop - offset]
        v = v * scale64 if v.dtype == torch.float64 else (v.float() * scale32).to(v.dtype)
        y[start - offset:stop - offset] = torch.where(_keep_span(start, stop, seed, threshold, x.device), v, 0)


def _c(src: Tensor, dst: Tensor, p: float, seed: int, offset: int = 0) -> None:
    lib, kind, size = _library(), KINDS[src.dtype], src.element_size()
    threshold, (scale32, scale64) = _threshold(p, "dropout"), _scales(p)
    a, b = src.data_ptr(), dst.data_ptr()

    def run(span: tuple[int, int]) -> None:
        start, stop = span  # positions in src; their flat indices are offset + position
        i = offset + start
        lib.pl_dropout(kind, a + start * size, b + start * size, stop - start, i & M32,
                       *_keys(seed, i >> 32), threshold, scale32, scale64)

    _cpu.run_blocks(run, _spans(src.numel(), torch.get_num_threads(), offset))


def _triton(src: Tensor, dst: Tensor, p: float, seed: int, offset: int = 0) -> None:
    threshold, (scale32, scale64) = _threshold(p, "dropout"), _scales(p)
    scale64_bits = struct.unpack("<q", struct.pack("<d", scale64))[0]
    x, y = src.view(-1), dst.view(-1)
    for start, stop in _spans(x.numel(), 1, offset):  # one run per segment the flat indices touch
        i = offset + start
        _triton_module().launch(x[start:stop], y[start:stop], *_keys(seed, i >> 32), threshold, scale32,
                                scale64_bits, lo=i & M32)


BACKENDS: dict[str, Callable[[Tensor, Tensor, float, int, int], None]] = {
    "c": _c, "triton": _triton, "torch": _torch_ops}


def _spans(n: int, threads: int, offset: int = 0) -> list[tuple[int, int]]:
    """Positions [0, n) in up to ``threads`` spans of at least MIN_SPAN elements (cut at multiples of 64), also
    cut wherever the flat index ``offset + position`` crosses a segment boundary. Results do not depend on the
    cuts."""
    parts = max(1, min(threads, n // MIN_SPAN))
    first = -offset % SEGMENT or SEGMENT  # the first position whose flat index starts a segment
    cuts = {n * k // parts // 64 * 64 for k in range(1, parts)} | set(range(first, n, SEGMENT))
    bounds = [0, *sorted(cuts), n]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# ---- detection ---------------------------------------------------------------------------------

def _check_dtype(t: Tensor, fn: str) -> None:
    if t.dtype not in KINDS:
        raise ValueError(f"{fn}: got a {t.dtype} tensor; dropout takes float32, bfloat16, float16 or float64")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = _cpu.build(SOURCE, _cpu.FLAGS, "dropout of CPU tensors uses torch ops (slower, the same bits)")
    if lib is None:
        return None
    u32 = ctypes.c_uint32
    lib.pl_dropout.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, u32, u32, u32, u32,
                               ctypes.c_float, ctypes.c_double]
    lib.pl_dropout.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def _triton_module():
    try:
        from . import _triton_dropout
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        log.debug("peftlite kernels: Triton unavailable (%s: %s); dropout of CUDA tensors uses torch ops",
                  type(e).__name__, e)
        return None
    return _triton_dropout


@functools.cache
def _detected(device_type: str) -> str:
    if device_type == "cpu":
        name = "c" if _library() is not None else "torch"
    elif device_type == "cuda":
        name = "triton" if _triton_module() is not None else "torch"
    else:
        name = "torch"
    log.debug("peftlite kernels: dropout of %s tensors runs on the %r backend", device_type, name)
    return name


@functools.cache
def _warn_once(device_type: str) -> None:
    log.warning("PEFTLITE_KERNELS=triton, but Triton %s for %s tensors; dropout uses the %r backend",
                "is not importable" if _triton_module() is None else "cannot run (set TRITON_INTERPRET=1 on CPU)",
                device_type, _detected(device_type))
