"""The Triton kernel of seeded dropout (``dropout``): one pass, the mask hashed in uint32 registers.

One launch covers one run of at most 2^32 elements (whose flat indices share their high 32 bits), with that
run's keys from the host; the hash, threshold and rounding are ``dropout``'s definition. 16-bit values
travel as their int16 bit patterns and are rounded with integer ops (``_triton_kernels._round``), since the
Triton interpreter truncates fp32 -> bf16 casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_kernels import BF16, FP16, FP32, _round, _to_f32

FP64 = 3
KINDS = {torch.float32: FP32, torch.bfloat16: BF16, torch.float16: FP16, torch.float64: FP64}
BLOCK, WARPS = 1024, 4


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer (uint32 in, uint32 out)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["n", "lo", "k1", "k2", "threshold", "scale64_bits"])
def dropout_kernel(x_ptr, y_ptr, n, lo, k1, k2, threshold, scale32, scale64_bits, KIND: tl.constexpr,
                   BLOCK: tl.constexpr):
    """y[j] = x[j]·scale if fmix32(fmix32((lo + j) ^ k1) ^ k2) >= threshold else 0, for j < n (lo + n <= 2^32).

    lo, k1, k2, threshold: uint32 values passed as int32 bit patterns (lo as an int64). scale64_bits: the
    fp64 scale's bits.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    h = (offs + lo.to(tl.int64)).to(tl.uint32) ^ k1.to(tl.uint32, bitcast=True)
    h = _fmix32(_fmix32(h) ^ k2.to(tl.uint32, bitcast=True))
    keep = h >= threshold.to(tl.uint32, bitcast=True)
    x = tl.load(x_ptr + offs, mask=inside, other=0)
    if KIND == 3:
        y = tl.where(keep, x * scale64_bits.to(tl.int64).to(tl.float64, bitcast=True), 0.0)
    elif KIND == 0:
        y = tl.where(keep, x * scale32, 0.0)
    else:
        bits = _round(_to_f32(x.to(tl.int32), KIND) * scale32, KIND)
        y = tl.where(keep, bits, 0).to(tl.int16)
    tl.store(y_ptr + offs, y, mask=inside)


def _i32(v: int) -> int:
    """A uint32 value as the int32 with its bits (so every call passes the same argument type)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def launch(src: Tensor, dst: Tensor, k1: int, k2: int, threshold: int, scale32: float, scale64_bits: int,
           lo: int = 0) -> None:
    """Drop out the 1-D contiguous run ``src`` (its flat indices from ``lo`` in its segment, ``lo + n <= 2^32``)
    into ``dst`` (the same tensor, or one of its shape that does not overlap it)."""
    kind = KINDS[src.dtype]
    if kind in (BF16, FP16):
        src, dst = src.view(torch.int16), dst.view(torch.int16)
    n = src.numel()
    dropout_kernel[(triton.cdiv(n, BLOCK),)](src, dst, n, lo, _i32(k1), _i32(k2), _i32(threshold), scale32,
                                            scale64_bits, KIND=kind, BLOCK=BLOCK, num_warps=WARPS)
