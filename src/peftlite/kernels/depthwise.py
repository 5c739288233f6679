"""The weight gradient of a depthwise conv on CPU: ``_depthwise.c``, built like the other C kernels.

Torch's CPU kernel for a depthwise conv's weight gradient runs at 1/15-1/40 of the conv's own speed
(ConvNeXt-T's 7x7 convs at 96 channels, 32x32, batch 8: 55 ms against 1.4 ms for the forward), and an
adapted depthwise conv trains through it (the ``dense`` path, ``layers/conv_autograd``). This one is
a loop nest that does a whole kernel row per vector multiply-add, with its accumulators in registers,
run on torch's threads over channel ranges (kernels up to 16x16).
Without a C compiler (or with ``PEFTLITE_CPU_FUSED=0``) ``weight_grad`` returns None and the caller
uses torch's kernel (logged once at debug level by ``_cpu.build``).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import _cpu

SOURCE = Path(__file__).with_name("_depthwise.c")
# GNU C for the vector types; fused multiply-adds allowed (no bit-exactness is promised here). No -ffast-math:
# it would set flush-to-zero process-wide.
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=fast"]
_FUNCS = {torch.float32: "pl_dw_grad_f32", torch.float64: "pl_dw_grad_f64"}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    lib = _cpu.build(SOURCE, FLAGS, "depthwise weight gradients use torch's kernel")
    if lib is None:
        return None
    for name in _FUNCS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 12
        fn.restype = ctypes.c_int
    return lib


def weight_grad(g: Tensor, x: Tensor, kernel_size: tuple[int, int], padding: tuple[int, int]) -> Tensor | None:
    """∂W (C, 1, kh, kw) of ``conv2d(x, W, stride=1, padding, groups=C)`` at g, or None where this kernel
    cannot run (not CPU, no compiler): then the caller takes torch's.

    Args:
        g: (N, C, Ho, Wo). x: (N, C, H, W), unpadded (``padding`` zeros around it). 16-bit inputs are
            read in fp32; the result has g's dtype.
    """
    lib = library() if g.device.type == "cpu" and x.device == g.device else None
    if lib is None or kernel_size[0] > 16 or kernel_size[1] > 16:  # the kernel's accumulators hold up to 16x16
        return None
    dtype = torch.float64 if torch.float64 in (g.dtype, x.dtype) else torch.float32
    gc, xc = g.to(dtype).contiguous(), x.to(dtype).contiguous()
    N, C, H, W = xc.shape
    Ho, Wo = gc.shape[-2:]
    kh, kw = kernel_size
    out = torch.empty(C, 1, kh, kw, dtype=dtype)
    fn = getattr(lib, _FUNCS[dtype])
    threads = max(1, min(torch.get_num_threads(), C))
    spans = [(C * k // threads, C * (k + 1) // threads) for k in range(threads)]
    failed = _cpu.run_blocks(lambda s: fn(gc.data_ptr(), xc.data_ptr(), out.data_ptr(), N, C, H, W, Ho, Wo, kh,
                                          kw, padding[0], padding[1], s[0], s[1]), spans)
    if any(failed):  # an allocation failed (or a shape the kernel does not take): torch's kernel instead
        return None
    return out.to(g.dtype)
