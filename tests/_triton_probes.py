"""Test-only Triton kernels that expose one piece of the merge kernel (imported under TRITON_INTERPRET=1)."""

import triton
import triton.language as tl

from peftlite.kernels._triton_kernels import _round


@triton.jit
def round_kernel(x_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """The kernel's rounding alone (fp32 -> 16-bit patterns), to compare with torch's casts."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, _round(x, KIND).to(tl.int16), mask=offs < n)
