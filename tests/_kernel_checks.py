"""Kernel checks shared by the CPU tests and the Triton-interpreter subprocess.

Run as ``python _kernel_checks.py NAME...``.

Each ``check_*`` raises AssertionError on failure and returns a short summary. Run as a script it sets
``TRITON_INTERPRET=1`` before Triton is imported, so the interpreter never leaks into the pytest process.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from peftlite import functional as F_

ULP_TOL = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # relative, ~1 ulp
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat = lambda t: t.contiguous().reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def problem(rows, cols, rank, dtype, ratio, seed=0, device="cpu"):
    """W, A, B, scale with std(scale·ΔW) = ratio·std(W)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g).to(dtype)
    A = torch.randn(rank, cols, generator=g)
    B = torch.randn(rows, rank, generator=g)
    scale = ratio / float((B @ A).std())
    return W.to(device), A.to(device), B.to(device), scale


def sequential_delta(A, B, scale):
    """ΔW = scale·(B @ A) as the torch backend defines it, computed independently in numpy fp32: products
    and sums over the rank in order (k = 0..r-1), each rounded on its own, then the scale.  (out, fan_in)"""
    a, b = A.detach().numpy().astype(np.float32), B.detach().numpy().astype(np.float32)
    d = b[:, :1] * a[:1]
    for k in range(1, a.shape[0]):
        d = d + b[:, k:k + 1] * a[k:k + 1]
    return torch.from_numpy(d * np.float32(scale))


def adversarial(dtype, seed, nan=False):
    """(48, 80) weights with zeros of both signs, subnormals, powers of two, extremes, infinities (and NaN)."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 8, -fi.tiny / 2, fi.smallest_normal * 3,
                            1.0, -1.0, 2.0, 0.5, fi.max / 4, -fi.max / 4, float("inf"), float("-inf")]
                           + [float("nan")] * nan).to(dtype)
    W = (torch.randn(48, 80, generator=g) * 10.0 ** torch.randint(-6, 4, (48, 80), generator=g)).to(dtype)
    pick = torch.rand(48, 80, generator=g) < 0.3
    W[pick] = special[torch.randint(0, special.numel(), (int(pick.sum()),), generator=g)]
    return W


def random_gain(rows, seed, special=True):
    """(rows,) float32 gains uniform in [0.5, 2]; with ``special``, some negated, some exact zeros (both
    signs) and ones."""
    g = torch.Generator().manual_seed(seed)
    gain = 0.5 + 1.5 * torch.rand(rows, generator=g)
    if special:
        pick = torch.randint(0, 8, (rows,), generator=g)
        gain = torch.where(pick == 0, -gain, gain)
        gain = torch.where(pick == 1, torch.ones_like(gain), gain)
        gain[pick == 2] = torch.where(torch.rand(int((pick == 2).sum()), generator=g) < 0.5, 0.0, -0.0)
    return gain


def gained_reference(W0, A, B, scale, gain):
    """The DoRA merge by its definition, elementwise in numpy fp32: t = fp32(w + d), u = fp32(t·g_row), then
    one rounding of u to W's dtype (by torch, as numpy has no bf16).  W0: (out, ...); gain: (out,)"""
    d = sequential_delta(A, B, scale).numpy().reshape(W0.shape)
    w = W0.float().numpy()
    g = gain.numpy().astype(np.float32).reshape((-1,) + (1,) * (W0.dim() - 1))
    t = (w + d).astype(np.float32)
    return torch.from_numpy((t * g).astype(np.float32)).to(W0.dtype)


def overflow_at(A, B, row, col, dtype):
    """Make ΔW zero except a huge positive value at (row, col), enough to overflow W's max there."""
    A.zero_()
    B.zero_()
    B[row] = 1.0 if dtype == torch.float16 else 1e29
    A[:, col] = 1e5 if dtype == torch.float16 else 1e8


def assert_close_to_oracle(merged, W0, A, B, scale):
    """Merged weight within about one ulp of ``functional.effective_weight`` (dot order may differ)."""
    ref = F_.effective_weight(W0, A, B, scale)
    err = (merged.float() - ref.float()).abs()
    # the dot's own rounding scales with its terms, not its result: bound by scale·|B|@|A|
    size = W0.float().abs() + abs(scale) * F_.delta_weight(A.abs(), B.abs(), W0.shape)
    tol = ULP_TOL[W0.dtype] * size + 1e-30
    assert bool((err <= 2 * tol).all()), f"{W0.dtype}: merged differs from the oracle by {float(err.max())}"
    return float((merged == ref).float().mean())


def cycles(mod, dtype, n, rows=16, cols=24, rank=4, ratio=1.0):
    """n merge/unmerge cycles through ``mod``; W must be bit-identical after every one."""
    W, A, B, scale = problem(rows, cols, rank, dtype, ratio, seed=n)
    W0 = W.clone()
    for i in range(n):
        rec = mod.merge_(W, A, B, scale)
        if i == 0:
            assert_close_to_oracle(W, W0, A, B, scale)
        mod.unmerge_(W, A, B, scale, rec)
        assert same_bits(W, W0), f"{dtype}: W changed after cycle {i + 1}"
    return rec


# ---- checks that need the Triton interpreter (run in a subprocess) --------------------------------

def check_triton_rounding():
    """The kernel's integer round-to-nearest-even matches torch's fp32 -> bf16/fp16 casts."""
    import triton

    from _triton_probes import round_kernel
    from peftlite.kernels import _triton_kernels as K

    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([1e-8, 6e-8, 3e-5, 6.1e-5, 1.0, 6e4, 6.6e4, 1e30])
    x = torch.randn(4096, generator=g) * scales[torch.randint(0, len(scales), (4096,), generator=g)]
    bits = torch.randint(-2**31, 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    edge = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 65519.99, 2.0**-24,
                         2.0**-25, 1.5 * 2.0**-25, 2.0**-25 * (1 + 2.0**-20), 1 + 2.0**-8, 1 + 3 * 2.0**-8,
                         1 + 2.0**-11])
    x = torch.cat([x, bits.view(torch.float32), edge, -edge])
    x = x[~torch.isnan(x)]
    for kind, dtype in ((K.BF16, torch.bfloat16), (K.FP16, torch.float16)):
        out = torch.empty(x.numel(), dtype=torch.int16)
        round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), KIND=kind, BLOCK=1024)
        ref = x.to(dtype).view(torch.int16)
        bad = (out != ref).nonzero().view(-1)
        assert bad.numel() == 0, f"{dtype}: {bad.numel()} casts differ, e.g. {x[bad[:3]].tolist()}"
    return f"{x.numel()} values"


def check_triton_cycles():
    from peftlite.kernels import _triton
    out = []
    for dtype in DTYPES:
        rec = cycles(_triton, dtype, 10, rows=32, cols=128, rank=20, ratio=0.3)  # one tile: the interpreter is slow
        out.append(f"{dtype}: {rec.bits_per_element:.2f} bits/el")
    return "; ".join(out)


def check_triton_small_buffers():
    """Tiles that find the code buffer or the escape list full write nothing and run again: same result.

    ΔW is exact here (rank 1, B powers of two), so the reference codec (``_codec``) says which originals
    escape: some of those planted 4 or 8 ulps inside -1, whose windows miss them, more than the list holds.
    """
    from peftlite.kernels import _codec, _triton
    from peftlite.kernels._bits import FORMATS, merged_value, unmerged_guess
    _triton.MIN_CODE_BITS, _triton.CODE_FRACTION, _triton.MIN_ESCAPES = 64, 10**9, 2
    for dtype in (torch.bfloat16, torch.float32):
        fmt = FORMATS[dtype]
        g = torch.Generator().manual_seed(2)
        W = torch.randn(40, 136, generator=g).to(dtype)
        W[:, ::2] = (-1 + 2.0 ** (1 - fmt.mantissa) * torch.randint(1, 3, (40, 68), generator=g)).to(dtype)
        W.view(-1)[::37] = float("inf")  # non-finite originals: coded in windows of the whole format
        W.view(-1)[5::41] = float("nan")
        A, B = torch.randn(1, 136, generator=g), 2.0 ** torch.randint(0, 4, (40, 1), generator=g)
        W0 = W.clone()
        d = (B @ A).view(-1)
        m = merged_value(W0.view(-1), d)
        guess = unmerged_guess(m, d)
        width, start = _codec.window(m, guess, d, fmt)
        escapes = _codec.encode(W0.view(-1), guess, width, start, fmt)[1].nonzero().view(-1)
        assert escapes.numel() > 2, f"{dtype}: only {escapes.numel()} escapes, too few to fill the list"
        rec = _triton.merge_(W, A, B, 1.0)
        assert torch.equal(rec.escape_index.sort().values, escapes), (rec.escape_index.numel(), escapes.numel())
        assert rec.flagged == int((width > 0).sum()), (rec.flagged, int((width > 0).sum()))
        assert rec.codes.numel() * 32 > 64  # the buffer grew
        _triton.unmerge_(W, A, B, 1.0, rec)
        assert same_bits(W, W0), f"{dtype}: not exact after reruns"
    return "ok"


def check_triton_special_values():
    """Zero tiles, ±0, subnormals, huge deltas; the memory bound where std(ΔW) ≤ std(W)."""
    from peftlite.kernels import _triton
    out = []
    for dtype in DTYPES:
        fi = torch.finfo(dtype)
        for ratio in (1e3,):
            W, A, B, scale = problem(36, 136, 4, dtype, ratio, seed=5)
            W[:32, :128] = 0.0  # one whole tile of zeros: long candidate runs
            W[32:, :64] = -0.0
            W[:, 120:130] = torch.tensor([fi.tiny, -fi.tiny, fi.tiny / 4, -fi.tiny / 8, fi.smallest_normal * 3,
                                          1.0, -2.0, 0.5, fi.max / 8, -fi.max / 8]).to(dtype)
            W0 = W.clone()
            rec = _triton.merge_(W, A, B, scale)
            assert_close_to_oracle(W, W0, A, B, scale)
            assert rec.nbytes <= W.numel() * W.element_size() * 1.05, f"{rec.bits_per_element:.2f} bits/el"
            _triton.unmerge_(W, A, B, scale, rec)
            assert same_bits(W, W0), f"{dtype} ratio {ratio}: not exact"
            out.append(f"{rec.bits_per_element:.1f}")
        W, A, B, scale = problem(32, 256, 8, dtype, 1.0, seed=8)
        rec = _triton.merge_(W, A, B, scale)
        assert rec.nbytes <= W.numel() * W.element_size() / 8, f"{dtype}: {rec.bits_per_element:.2f} bits/el"
        out.append(f"bound {rec.bits_per_element:.2f}")
    return "bits/el " + ", ".join(out)


def check_triton_nonfinite():
    from peftlite.kernels import NonFiniteMergeError, _triton
    for dtype in DTYPES:
        W, A, B, scale = problem(40, 136, 4, dtype, 0.1)
        W[3, 5] = torch.finfo(dtype).max
        overflow_at(A, B, 3, 5, dtype)
        W0 = W.clone()
        try:
            _triton.merge_(W, A, B, 1.0)
        except NonFiniteMergeError:
            pass
        else:
            raise AssertionError(f"{dtype}: an overflowing merge did not raise")
        assert same_bits(W, W0), f"{dtype}: W changed by a refused merge"
        A2 = A.clone()
        A2[0, 0] = float("nan")
        try:
            _triton.merge_(W, A2, B, 0.1)
        except NonFiniteMergeError:
            pass
        else:
            raise AssertionError(f"{dtype}: a NaN adapter did not raise")
        assert same_bits(W, W0)
    return "ok"


def check_triton_layouts():
    """channels_last, grouped and transposed weights through as_matrix, merged by the Triton kernels."""
    from peftlite import kernels
    os.environ["PEFTLITE_KERNELS"] = "triton"
    return layouts(kernels, expect="triton")


def check_triton_gain():
    """Gain merges (DoRA) go to the torch backend where Triton is chosen; plain merges stay on Triton."""
    from peftlite import kernels
    os.environ["PEFTLITE_KERNELS"] = "triton"
    for dtype in DTYPES:
        W, A, B, scale = problem(32, 128, 4, dtype, 0.3)
        W0 = W.clone()
        gain = random_gain(32, seed=1)
        rec = kernels.merge_(W, A, B, scale, gain=gain)
        assert rec.backend == "torch", rec.backend
        assert same_bits(W, gained_reference(W0, A, B, scale, gain)), f"{dtype}: merged differs from the definition"
        kernels.unmerge_(W, A, B, scale, rec)
        assert same_bits(W, W0), f"{dtype}: not exact"
        assert kernels.merge_(W, A, B, scale).backend == "triton"
    return "routed to torch"


def layouts(kernels, expect):
    g = torch.Generator().manual_seed(3)
    cases = []
    w = torch.randn(24, 6, 3, 3, generator=g).to(memory_format=torch.channels_last)  # channels_last conv
    cases.append(("channels_last", w))
    cases.append(("grouped", torch.randn(24, 2, 3, 3, generator=g)))  # groups=3 of 6 channels: fan_in 2*9
    cases.append(("depthwise", torch.randn(16, 1, 5, 5, generator=g)))
    cases.append(("transposed", torch.randn(40, 24, generator=g).t()))  # a (24, 40) weight stored as Vᵀ
    for name, weight in cases:
        for dtype in DTYPES:
            W = weight.to(dtype)
            A = torch.randn(4, W[0].numel(), generator=g)
            B = torch.randn(W.shape[0], 4, generator=g)
            W0 = W.clone(memory_format=torch.preserve_format)
            ptr = W.data_ptr()
            w2, a2, b2 = kernels.as_matrix(W, A, B)
            assert w2.data_ptr() == ptr
            rec = kernels.merge_(w2, a2, b2, 0.5)
            assert rec.backend == expect, (rec.backend, expect)
            assert_close_to_oracle(W, W0, A, B, 0.5)
            kernels.unmerge_(w2, a2, b2, 0.5, rec)
            assert same_bits(W, W0), f"{name} {dtype}: unmerge is not exact"
            assert W.stride() == W0.stride(), f"{name}: layout changed"
    return f"{len(cases)} layouts"


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    failed = False
    for name in sys.argv[1:]:
        try:
            print(f"{name}: {globals()[name]()}", flush=True)
        except AssertionError as e:
            failed = True
            print(f"{name}: FAILED {e}", flush=True)
    sys.exit(1 if failed else 0)
