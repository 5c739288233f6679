"""Merges with a per-row gain (DoRA): ``W' = round(g_i·(W_ij + ΔW_ij))``, unmerged bit-exactly.

Against the definition computed elementwise (``gained_reference``), over many cycles, in both CPU
implementations (torch ops and the fused C pass, whose records must agree to the bit), with negative,
zero and unit gains, through ``as_matrix`` layouts, within the memory bound, and refusing what cannot be
merged with the weight unchanged. The Triton routing is checked in test_kernels.py's interpreter run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from peftlite import kernels
from peftlite.kernels import _codec, _cpu, _torch
from peftlite.kernels._bits import FORMATS, bits, from_ordinal, merged_value, ordinal, unmerged_guess

sys.path.insert(0, str(Path(__file__).parents[1]))
from _kernel_checks import (  # noqa: E402
    DTYPES,
    adversarial,
    gained_reference,
    problem,
    random_gain,
    same_bits,
    sequential_delta,
)

needs_fused = pytest.mark.skipif(_cpu.library() is None, reason="the fused CPU pass needs a C compiler")
FUSED = [pytest.param(False, id="ops"), pytest.param(True, id="fused", marks=needs_fused)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gain_unmerge_bit_exact_over_1000_cycles(dtype):
    """A new random gain every cycle (signs, zeros, ones among them); merged as defined, then W back."""
    W, A, B, scale = problem(16, 24, 4, dtype, 1.0, seed=3)
    W0 = W.clone()
    for i in range(1000):
        gain = random_gain(16, seed=i)
        rec = kernels.merge_(W, A, B, scale, gain=gain)
        if i % 10 == 0:
            assert same_bits(W, gained_reference(W0, A, B, scale, gain)), f"{dtype}: cycle {i + 1} merged wrongly"
        kernels.unmerge_(W, A, B, scale, rec)
        assert same_bits(W, W0), f"{dtype}: W changed after cycle {i + 1}"


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.05, 1.0, 30.0])
def test_gain_merge_is_the_definition_and_unmerges_exactly(dtype, ratio, fused):
    W, A, B, scale = problem(96, 160, 8, dtype, max(ratio, 1e-30), seed=1)
    gain = random_gain(96, seed=2)
    W0 = W.clone()
    rec = _torch.merge_(W, A, B, scale, block_elements=2048, fused=fused, gain=gain)  # several blocks
    assert same_bits(W, gained_reference(W0, A, B, scale, gain))
    zero = gain == 0
    assert rec.raw_rows == int(zero.sum()) > 0 and bool((W[zero] == 0).all())
    _torch.unmerge_(W, A, B, scale, rec, block_elements=2048, fused=fused)
    assert same_bits(W, W0)


def _extreme_gain(rows, seed):
    """Random gains (signs, zeros, ones) plus extremes: small, tiny (fp16 merges whole rows to ±0: long runs),
    subnormal, beyond 2, and next to ±1."""
    gain = random_gain(rows, seed)
    tiny = torch.finfo(torch.float32).tiny
    extra = torch.tensor([1e-3, -7e-3, 3.0, -3.5, tiny, -tiny / 64, 1e-30, 1.0 + 2.0**-23, -(1.0 - 2.0**-24)])
    gain[1:1 + extra.numel()] = extra
    return gain


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["random", "adversarial"])
def test_fused_gain_records_are_bit_identical_to_the_torch_ops(dtype, case):
    """Same merged W, codes, escapes and raw rows from both; each unmerges the other's record."""
    for ratio in (1e-3, 0.1, 3.0):
        W, A, B, scale = problem(48, 80, 4, dtype, ratio, seed=11)
        if case == "adversarial":
            W = adversarial(dtype, 5)
            W[:, 70:] = torch.finfo(dtype).max / 2  # huge but finite once merged: gains beyond 2 become ±1.5
        gain = _extreme_gain(48, seed=int(ratio * 1000))
        if case == "adversarial":
            gain = torch.where(gain.abs() > 2, gain.sign() * 1.5, gain)
        W0, Wf = W.clone(), W.clone()
        ops = _torch.merge_(W, A, B, scale, block_elements=1024, fused=False, gain=gain)
        fus = _torch.merge_(Wf, A, B, scale, block_elements=1024, fused=True, gain=gain)
        nan = torch.isnan(W)  # ±inf in rows of gain 0: NaN, whose payload differs (as torch's casts do)
        assert torch.equal(nan, torch.isnan(Wf)) and same_bits(W[~nan], Wf[~nan]), (case, ratio)
        assert torch.equal(ops.codes, fus.codes) and torch.equal(ops.chunks, fus.chunks), (case, ratio)
        assert torch.equal(ops.escape_index, fus.escape_index) and ops.flagged == fus.flagged, (case, ratio)
        assert same_bits(ops.escape_values, fus.escape_values) and same_bits(ops.raw_values, fus.raw_values)
        _torch.unmerge_(W, A, B, scale, fus, block_elements=1024, fused=False)
        _torch.unmerge_(Wf, A, B, scale, ops, block_elements=1024, fused=True)
        assert same_bits(W, W0) and same_bits(Wf, W0), (case, ratio)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_infinite_weights_come_back_with_their_bits(dtype, fused):
    """NaN stays NaN under a gain (its payload may change, as in plain merges) and ±inf keeps its sign times
    the gain's; unmerge restores their exact bits from escapes."""
    W = adversarial(dtype, 6, nan=True)
    W0 = W.clone()
    gain = _extreme_gain(48, seed=3).clamp(-1.9, 1.9)
    A, B = torch.randn(4, 80), torch.randn(48, 4)
    rec = _torch.merge_(W, A, B, 0.1, block_elements=1024, fused=fused, gain=gain)
    live = (gain != 0)[:, None].expand_as(W)
    assert bool(torch.isnan(W[torch.isnan(W0) & live]).all())
    inf = torch.isinf(W0) & live
    assert torch.equal(W[inf], (W0.float() * gain[:, None]).to(dtype)[inf])
    _torch.unmerge_(W, A, B, 0.1, rec, block_elements=1024, fused=fused)
    assert same_bits(W, W0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gain_windows_against_every_value_of_the_format(dtype):
    """Against every value of the 16-bit format, under a gain of either sign: width 0 only where the guess is
    the one original, and the window holds the whole run of originals that merge to W'."""
    fmt = FORMATS[dtype]
    every = from_ordinal(torch.arange(-1 - fmt.max_finite, fmt.max_finite + 1), fmt)
    g = torch.Generator().manual_seed(4)
    held = coded = 0
    for i in range(32):
        w = every[torch.randint(0, every.numel(), (1,), generator=g)]
        if i % 4 == 0:
            w = (torch.randn(1, generator=g) * 4).to(dtype)
        d = torch.randn(1, generator=g) * 10.0 ** float(torch.randint(-4, 2, (1,), generator=g))
        gain = (0.5 + 1.5 * torch.rand(1, generator=g)) * (-1 if i % 2 else 1)
        merged = merged_value(w, d, gain)
        if not bool(torch.isfinite(merged).all()):
            continue
        hits = (bits(merged_value(every, d.expand(every.numel()), gain)) == bits(merged)).nonzero().view(-1)
        assert torch.equal(hits, hits[0] + torch.arange(hits.numel()))  # one run
        guess = unmerged_guess(merged, d, gain)
        width, start = _codec.window(merged, guess, d, fmt, gain)
        if int(width) == 0:
            assert hits.numel() == 1 and same_bits(every[hits], guess)
        else:
            coded += 1
            offsets = (ordinal(bits(every[hits]), fmt) - start) & 0xFFFFFFFF
            held += bool((offsets < 2 ** int(width)).all())
    assert coded >= 8 and held == coded, (held, coded)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_conv_and_grouped_weights_through_as_matrix(dtype):
    gen = torch.Generator().manual_seed(3)
    cases = [torch.randn(24, 6, 3, 3, generator=gen).to(memory_format=torch.channels_last),
             torch.randn(24, 2, 3, 3, generator=gen)]  # grouped: fan_in 2·9
    for weight in cases:
        W = weight.to(dtype)
        A = torch.randn(4, W[0].numel(), generator=gen)
        B = torch.randn(W.shape[0], 4, generator=gen)
        gain = random_gain(W.shape[0], seed=5)
        W0 = W.clone(memory_format=torch.preserve_format)
        w2, a2, b2 = kernels.as_matrix(W, A, B, gain=gain)
        assert w2.data_ptr() == W.data_ptr()
        rec = kernels.merge_(w2, a2, b2, 0.5, gain=gain)
        assert same_bits(W, gained_reference(W0, A, B, 0.5, gain))  # in the logical (out, c, kh, kw) order
        kernels.unmerge_(w2, a2, b2, 0.5, rec)
        assert same_bits(W, W0) and W.stride() == W0.stride()


def test_transposed_weight_refuses_a_gain():
    W = torch.randn(40, 24).t()  # a (24, 40) weight stored as Vᵀ: its matrix rows are its inputs
    A, B, gain = torch.randn(4, 40), torch.randn(24, 4), random_gain(24, seed=0)
    with pytest.raises(ValueError, match=r"\(24, 40\) with strides \(1, 24\).*weight.data = weight.data.contiguous"):
        kernels.as_matrix(W, A, B, gain=gain)
    w2, a2, b2 = kernels.as_matrix(W, A, B)  # without the check, the row count gives it away
    with pytest.raises(ValueError, match=r"shape \(24,\) does not fit .* \(40, 24\).*contiguous"):
        kernels.merge_(w2, a2, b2, 0.5, gain=gain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_memory_bound_with_gain(dtype):
    """The record stays within 1/8 of W's bytes for std(ΔW)/std(W) ≤ 1 and gains in [0.5, 2]."""
    rows = []
    for g in (0.75, 1.0, 1.3, 0.5, 2.0, -1.3):
        for ratio in (0.05, 0.1, 1.0):
            W, A, B, scale = problem(256, 256, 16, dtype, ratio, seed=7)
            rec = kernels.merge_(W, A, B, scale, gain=torch.full((256,), g))
            rows.append(f"{dtype} g={g} ratio={ratio}: {rec.bits_per_element:.3f} bits/el, "
                        f"{rec.flagged / W.numel():.3f} flagged")
            assert rec.nbytes <= W.numel() * W.element_size() / 8, rows[-1]
            assert rec.escape_index.numel() <= W.numel() // 1000, rows[-1]  # the window estimate rarely misses
    mixed = random_gain(256, seed=1, special=False)
    W, A, B, scale = problem(256, 256, 16, dtype, 1.0, seed=7)
    assert kernels.merge_(W, A, B, scale, gain=mixed).nbytes <= W.numel() * W.element_size() / 8
    print("\n".join(rows))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gain_refused_with_weight_unchanged(bad, fused):
    W, A, B, scale = problem(16, 24, 2, torch.bfloat16, 0.1)
    gain = random_gain(16, seed=0)
    gain[9] = bad
    W0 = W.clone()
    with pytest.raises(kernels.NonFiniteMergeError, match=rf"gain\[9\] = {bad!r} is not finite"):
        _torch.merge_(W, A, B, scale, fused=fused, gain=gain)
    assert same_bits(W, W0)


def test_gain_of_the_wrong_dtype_or_shape_is_refused():
    W, A, B, scale = problem(16, 24, 2, torch.float16, 0.1)
    with pytest.raises(ValueError, match=r"torch.float64.*gain.float\(\)"):
        kernels.merge_(W, A, B, scale, gain=torch.ones(16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(16, 1\).*shape \(16,\)"):
        kernels.merge_(W, A, B, scale, gain=torch.ones(16, 1))
    with pytest.raises(ValueError, match=r"on meta.*gain.to\(weight.device\)"):
        kernels.merge_(W, A, B, scale, gain=torch.ones(16, device="meta"))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gain_overflow_rolls_back_with_weight_bit_identical(dtype, fused):
    """A later block overflows under its gain; the earlier blocks (codes, escapes, zero-gain rows) and the
    failing block are put back exactly."""
    W, A, B, scale = problem(64, 64, 4, dtype, 0.5)
    W[40, 7] = torch.finfo(dtype).max
    W[2, 3] = float("nan")  # an escape to undo
    gain = random_gain(64, seed=6)
    gain[40] = 2.0  # (max + ΔW)·2 overflows
    assert int((gain == 0).sum()) > 0
    W0 = W.clone()
    with pytest.raises(kernels.NonFiniteMergeError, match=r"weight\[40, 7\].*gain\[40\] = 2.0"):
        _torch.merge_(W, A, B, scale, block_elements=512, fused=fused, gain=gain)
    assert same_bits(W, W0)


def test_float64_weights_with_a_gain_stay_exact():
    """fp64 has no codec: the merge is computed in fp64 and every wrong guess is an escape."""
    W, A, B, scale = problem(20, 30, 4, torch.float64, 1.0)
    gain = random_gain(20, seed=2)
    W0 = W.clone()
    rec = _torch.merge_(W, A, B, scale, gain=gain)
    assert torch.equal(W, (W0 + sequential_delta(A, B, scale).double()) * gain[:, None].double())
    _torch.unmerge_(W, A, B, scale, rec)
    assert same_bits(W, W0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_gain_merges_run_on_torch_ops_exactly(dtype):
    W, A, B, scale = problem(512, 768, 16, dtype, 0.3, device="cuda")
    gain = random_gain(512, seed=4).cuda()
    W0 = W.clone()
    for _ in range(5):
        rec = kernels.merge_(W, A, B, scale, gain=gain)
        assert rec.backend == "torch"
        kernels.unmerge_(W, A, B, scale, rec)
        assert same_bits(W, W0)
    kernels.merge_(W, A, B, scale, gain=gain)
    assert same_bits(W.cpu(), gained_reference(W0.cpu(), A.cpu(), B.cpu(), scale, gain.cpu()))
