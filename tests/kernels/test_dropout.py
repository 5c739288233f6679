"""Seeded dropout (``kernels.dropout``): every backend bit-identical to the ``keep_mask`` oracle, and the mask's
statistics.

The oracle is checked against a scalar Python definition of the hash (and splitmix64's published first
output); each backend here (the C kernel, torch ops, Triton under the interpreter) against the oracle, for every
dtype, odd sizes, strides, span splits and thread counts. Triton runs in a subprocess (this file as a script):
``TRITON_INTERPRET=1`` must be set before Triton is imported. CUDA tests skip without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peftlite.kernels import dropout as D

M32, M64 = (1 << 32) - 1, (1 << 64) - 1
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HAS_C = D._library() is not None
CPU_BACKENDS = [pytest.param("torch", id="torch"),
                pytest.param("c", id="c", marks=pytest.mark.skipif(not HAS_C, reason="needs a C compiler"))]
SPECIALS = [float("inf"), -float("inf"), float("nan"), -0.0, 0.0, 1e-40, -3e-8, 6e-8, 3e38, 65504.0, 1e5, -2.5]


# ---- the definition, written out in scalar Python ---------------------------------------------------------

def fmix32(h):
    h ^= h >> 16
    h = h * 0x85EBCA6B & M32
    h ^= h >> 13
    h = h * 0xC2B2AE35 & M32
    return h ^ (h >> 16)


def splitmix64(state, k):
    """Output number k (from 1) of splitmix64 started at ``state``."""
    z = (state + k * 0x9E3779B97F4A7C15) & M64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & M64
    return z ^ (z >> 31)


def scalar_hash(seed, i):
    k = splitmix64(seed & M64, (i >> 32) + 1)
    return fmix32(fmix32((i & M32) ^ (k & M32)) ^ (k >> 32))


def test_hash_is_the_documented_definition():
    assert splitmix64(0, 1) == 0xE220A8397B1DCDAF  # splitmix64's published first output for seed 0
    assert [scalar_hash(0, i) for i in range(4)] == [0x59E7DC65, 0x791BBF9B, 0x2BA08C4A, 0x6E91CFA4]
    assert scalar_hash(M64, (1 << 32) + 5) == 0xABCBE1A7
    for seed in (0, 12345, M64, 1 << 63, -1):
        for p in (0.1, 0.5, 0.9):
            t = round(p * 2**32)
            want = torch.tensor([scalar_hash(seed, i) >= t for i in range(300)])
            assert torch.equal(D.keep_mask((300,), seed, p, "cpu"), want)
    # the index's high 32 bits enter: the spans on either side of 2^32 follow the definition too
    for start in (2**32 - 40, 2**32, 5 * 2**32 + 7):
        want = torch.tensor([scalar_hash(99, i) >= 2**31 for i in range(start, start + 40)])
        assert torch.equal(D._keep_span(start, start + 40, 99, 2**31, torch.device("cpu")), want)
    assert D._keys(7, 0) != D._keys(7, 1)


def test_threshold_and_scales():
    assert D._threshold(0.5, "f") == 2**31 and D._threshold(0.0, "f") == 0
    assert D._threshold(1 - 2**-40, "f") == M32  # clamped: P(drop) = p to within 2^-32
    for p in (0.1, 0.3, 0.9, 1 / 3):
        s32, s64 = D._scales(p)
        assert s32 == float(np.float32(1 / (1 - p))) and s64 == 1 / (1 - p)


# ---- every backend against the oracle -------------------------------------------------------------------

def sample(shape, dtype, seed=0):
    """randn values with the special ones (inf, NaN, signed zeros, subnormals, overflow on scaling) mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[::5] = torch.tensor(SPECIALS)[torch.arange(flat[::5].numel()) % len(SPECIALS)]
    return x.to(dtype)


def reference(x, p, seed, keep=None):
    """The definition: ``keep_mask`` (or ``keep``, its value) and the documented rounding, with the scale
    rounded by numpy."""
    keep = D.keep_mask(x.shape, seed, p, x.device) if keep is None else keep
    x = x.contiguous()
    if x.dtype == torch.float64:
        v = x * (1 / (1 - p))
    else:
        v = (x.float() * float(np.float32(1 / (1 - p)))).to(x.dtype)
    return torch.where(keep, v, torch.zeros((), dtype=x.dtype, device=x.device))


def assert_same_bits(got, want):
    """Bit-identical, except that kept NaNs of 16-bit dtypes need only be NaN (their payload is the backend's)."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    got, want = got.cpu(), want.cpu()
    if got.dtype in (torch.bfloat16, torch.float16):
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        got, want = got[~nan], want[~nan]
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def run(backend, x, p, seed, inplace=False):
    src = x.contiguous()
    out = src if inplace else torch.empty_like(src)
    D.BACKENDS[backend](src, out, p, seed)
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends_match_the_oracle_bit_for_bit(backend, dtype, monkeypatch):
    monkeypatch.setattr(D, "CPU_CHUNK", 1024)  # torch ops: several chunks even for small tensors
    monkeypatch.setattr(D, "MIN_SPAN", 128)  # C: several spans on torch's threads
    for n in (1, 7, 63, 64, 65, 1023, 1024, 1025, 4099):
        for p in (0.1, 0.5, 0.9):
            seed = D.new_seed()
            x = sample((n,), dtype, seed=n)
            assert_same_bits(run(backend, x, p, seed), reference(x, p, seed))
            assert_same_bits(run(backend, x.clone(), p, seed, inplace=True), reference(x, p, seed))


@functools.lru_cache(maxsize=1)
def million_and_three_mask():
    return D.keep_mask((1_000_003,), 0xFEED_F00D_1234, 0.3, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_functions_on_a_million_and_three(dtype):
    x, seed = sample((1_000_003,), dtype), 0xFEED_F00D_1234
    want = reference(x, 0.3, seed, keep=million_and_three_mask())
    assert_same_bits(D.dropout(x, 0.3, seed), want)
    t = x.clone()
    assert D.dropout_(t, 0.3, seed) is t
    assert_same_bits(t, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_any_strides_read_as_if_contiguous(dtype):
    base = sample((6, 10, 7, 5), dtype)
    cases = [base.transpose(1, 3), base[:, ::3, 1:], base.to(memory_format=torch.channels_last),
             base[0, 0, 0].expand(9, 5), base.permute(3, 2, 1, 0)[::2]]
    for x in cases:
        before = x.contiguous().clone()
        for backend in ("torch", "c") if HAS_C else ("torch",):
            seed = D.new_seed()
            got = run(backend, x, 0.4, seed)
            assert_same_bits(got, reference(x, 0.4, seed))
        got = D.dropout(x, 0.4, seed)
        assert got.shape == x.shape and got.is_contiguous()
        assert_same_bits(got, reference(x, 0.4, seed))
        assert_same_bits(x.contiguous(), before)  # read only


@pytest.mark.skipif(not HAS_C, reason="needs a C compiler")
def test_result_does_not_depend_on_threads_or_spans(monkeypatch):
    x = sample((300_001,), torch.float32)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n_threads, min_span in ((1, 1 << 20), (2, 64), (3, 1000), (4, 64)):
            torch.set_num_threads(n_threads)
            monkeypatch.setattr(D, "MIN_SPAN", min_span)
            outs.append(D.dropout(x, 0.25, 77))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert_same_bits(out, outs[0])


def span_reference(x, p, seed, offset):
    """The definition for a run whose flat indices start at ``offset`` (it may cross a segment boundary)."""
    threshold, cpu = D._threshold(p, "t"), torch.device("cpu")
    pieces, i, end = [], offset, offset + x.numel()
    while i < end:
        stop = min(end, (i >> 32) + 1 << 32)
        pieces.append(D._keep_span(i, stop, seed, threshold, cpu))
        i = stop
    return reference(x, p, seed, keep=torch.cat(pieces).view(x.shape).to(x.device))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_offset_drops_a_slice_with_the_mask_of_the_whole(backend, dtype, monkeypatch):
    monkeypatch.setattr(D, "CPU_CHUNK", 1024)
    monkeypatch.setattr(D, "MIN_SPAN", 128)
    monkeypatch.setattr(D, "_detected", lambda device_type: backend)
    whole = sample((6, 7, 50), dtype)
    flat, seed = whole.view(-1), D.new_seed()
    want = D.dropout(whole, 0.3, seed).view(-1)
    for start, stop in ((0, 2100), (350, 700), (1, 1025), (1700, 2100), (5, 6)):
        assert_same_bits(D.dropout(flat[start:stop], 0.3, seed, offset=start), want[start:stop])
        t = flat[start:stop].clone()
        assert_same_bits(D.dropout_(t, 0.3, seed, offset=start), want[start:stop])
    turned = whole.transpose(1, 2)  # read as if contiguous: the offset counts in that order
    want_turned = D.dropout(turned, 0.3, seed).view(-1)
    assert_same_bits(D.dropout(turned[2:4], 0.3, seed, offset=700), want_turned[700:1400].view(2, 50, 7))
    for offset in (2**32 - 300, 2**32 - 1, 2**32, 3 * 2**32 + 11, 2**64 + 5):  # across and beyond a segment
        x = sample((1000,), dtype, seed=offset % 97)
        assert_same_bits(D.dropout(x, 0.4, seed, offset=offset), span_reference(x, 0.4, seed, offset))
    with pytest.raises(ValueError, match="offset=-1 is negative"):
        D.dropout(flat, 0.3, seed, offset=-1)
    with pytest.raises(TypeError, match="offset must be an int"):
        D.dropout_(flat.clone(), 0.3, seed, offset=1.5)


def test_spans_cover_everything_and_cut_at_segments():
    for n, threads in ((5, 4), (3 * D.MIN_SPAN + 1, 2), (2**33 + 5, 3), (2**32, 1), (2**32 + 1, 1)):
        spans = D._spans(n, threads)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a < b and b == c for (a, b), (c, _) in zip(spans, spans[1:] + [(n, n)]))
        assert all(a >> 32 == (b - 1) >> 32 for a, b in spans), spans  # each span within one segment
        assert len(spans) <= threads + n // 2**32
    for offset, n in ((2**32 - 10, 100), (2**32, 5), (7, 2**33), (2**33 - 1, 2)):
        spans = D._spans(n, 1, offset)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a + offset >> 32 == b - 1 + offset >> 32 for a, b in spans), spans
        assert len(spans) == ((offset + n - 1) >> 32) - (offset >> 32) + 1


# ---- the mask's statistics ----------------------------------------------------------------------------

N = 1 << 20


def mask(seed, p):
    """The kept elements of N, by the backend detected here (each is the oracle's, to the bit: above)."""
    return D.dropout(torch.ones(N), p, seed) != 0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fraction_dropped_is_p_within_six_sigma(p):
    sigma = math.sqrt(p * (1 - p) / N)
    for seed in (0, 1, D.new_seed(), M64):
        dropped = 1 - mask(seed, p).double().mean().item()
        assert abs(dropped - p) < 6 * sigma, (seed, dropped)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_of_neighbouring_seeds_and_elements_are_uncorrelated(p):
    """Agreement of two independent masks: p² + (1-p)², within 6 sigma; seeds that differ in one bit, low or
    high, and neighbouring elements of one mask."""
    agree = p * p + (1 - p) ** 2
    sigma = math.sqrt(agree * (1 - agree) / N)
    base = 0x0123_4567_89AB_CDEF
    m = mask(base, p)
    pairs = [(m, mask(base + d, p)) for d in (1, -1, 2**32, 2**63)] + [(m[1:], m[:-1])]
    for a, b in pairs:
        assert not torch.equal(a, b)
        rate = (a == b).double().mean().item()
        assert abs(rate - agree) < 6 * sigma, rate


# ---- the contract ---------------------------------------------------------------------------------------

def test_p_zero_is_identity_and_bad_p_raises():
    x = torch.randn(4, 5).t()
    assert D.dropout(x, 0.0, 1) is x
    t = torch.randn(7)
    before = t.clone()
    assert D.dropout_(t, 0, 1) is t and torch.equal(t, before)
    assert D.keep_mask((3,), 5, 0.0, "cpu").all()
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.1"):
        for fn, arg in ((D.dropout, x), (D.dropout_, t), (D.keep_mask, (3,))):
            with pytest.raises(ValueError, match=re.escape(f"p={bad!r} is outside [0, 1)")):
                fn(arg, 1, bad, "cpu") if fn is D.keep_mask else fn(arg, bad, 1)


def test_empty_tensors_and_tensors_that_require_grad():
    for shape in ((0,), (3, 0, 2)):
        assert D.dropout(torch.empty(shape), 0.5, 1).shape == shape
        assert D.keep_mask(shape, 1, 0.5, "cpu").shape == shape
    x = torch.randn(50, requires_grad=True)
    y = D.dropout(x, 0.5, 9)
    assert y.grad_fn is None and not y.requires_grad  # a kernel: the autograd function owns the graph
    assert_same_bits(y, reference(x.detach(), 0.5, 9))


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="contiguous"):
        D.dropout_(torch.randn(4, 5).t(), 0.5, 1)
    with pytest.raises(ValueError, match="torch.int64"):
        D.dropout(torch.arange(5), 0.5, 1)
    with pytest.raises(TypeError, match="seed"):
        D.dropout(torch.randn(5), 0.5, 1.5)


def test_new_seed_is_reproducible_under_manual_seed():
    torch.manual_seed(3)
    a = [D.new_seed() for _ in range(4)]
    torch.manual_seed(3)
    assert [D.new_seed() for _ in range(4)] == a
    assert len(set(a)) == 4 and all(0 <= s <= M64 for s in a)
    assert any(s >= 2**63 for s in (D.new_seed() for _ in range(64)))  # all 64 bits are drawn


def test_checkpoint_replay_draws_the_same_seed():
    seeds = []

    def f(x):
        seeds.append(D.new_seed())
        return (x * 2).sin()  # sin keeps its input for backward: the checkpoint recomputes f

    x = torch.randn(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False).sum().backward()
    assert len(seeds) == 2 and seeds[0] == seeds[1]


def test_backend_detection_and_fallbacks(monkeypatch, tmp_path, caplog):
    x = torch.zeros(3)
    monkeypatch.delenv("PEFTLITE_KERNELS", raising=False)
    assert D.backend_for(x) == ("c" if HAS_C else "torch")
    monkeypatch.setenv("PEFTLITE_KERNELS", "torch")
    assert D.backend_for(x) == ("c" if HAS_C else "torch")  # the C kernel follows PEFTLITE_CPU_FUSED
    monkeypatch.setenv("PEFTLITE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    D._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="peftlite.kernels"):
        assert D.backend_for(x) == ("c" if HAS_C else "torch")
    assert "PEFTLITE_KERNELS=triton" in caplog.text
    monkeypatch.delenv("PEFTLITE_KERNELS")
    # without a compiler, CPU tensors run on torch ops, logged, with the same bits
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("PEFTLITE_CACHE", str(tmp_path))
    D._library.cache_clear()
    D._detected.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="peftlite.kernels"):
            assert D.backend_for(x) == "torch"
        assert "dropout of cpu tensors runs on the 'torch' backend" in caplog.text
        y = sample((100,), torch.float32)
        assert_same_bits(D.dropout(y, 0.5, 3), reference(y, 0.5, 3))
    finally:
        D._library.cache_clear()
        D._detected.cache_clear()


# ---- Triton: under the interpreter here (a subprocess), on the GPU where there is one --------------------

def triton_checks():
    """Run with TRITON_INTERPRET=1 and PEFTLITE_KERNELS=triton: the public functions on the Triton backend."""
    assert D.backend_for(torch.zeros(1)) == "triton", D.backend_for(torch.zeros(1))
    for dtype in DTYPES:
        for n in (1, 7, 1023, 1025, 2500):
            seed = D.new_seed()
            x = sample((n,), dtype, seed=n)
            want = reference(x, 0.3, seed)
            assert_same_bits(D.dropout(x, 0.3, seed), want)
            t = x.clone()
            assert_same_bits(D.dropout_(t, 0.3, seed), want)
            if HAS_C:
                assert torch.equal(run("c", x, 0.3, seed).view(torch.uint8), t.view(torch.uint8))  # NaNs too
        x = sample((30, 40), dtype).t()
        assert_same_bits(D.dropout(x, 0.9, 5), reference(x, 0.9, 5))
        whole = sample((2500,), dtype)
        want = reference(whole, 0.3, 9)
        assert_same_bits(D.dropout(whole[700:1900], 0.3, 9, offset=700), want[700:1900])
        for offset in (2**32 - 300, 3 * 2**32 + 11):
            x = sample((1000,), dtype)
            assert_same_bits(D.dropout(x, 0.4, 9, offset=offset), span_reference(x, 0.4, 9, offset))
    print("triton checks: ok")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PEFTLITE_KERNELS="triton")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-W", "ignore", __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "triton checks: ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_the_oracle(dtype):
    assert D.backend_for(torch.zeros(1, device="cuda")) == "triton"
    for n in (1, 1025, (1 << 22) + 3):
        seed = D.new_seed()
        x = sample((n,), dtype).cuda()
        want = reference(x, 0.2, seed)
        assert_same_bits(D.dropout(x, 0.2, seed), want)
        assert_same_bits(run("torch", x, 0.2, seed), want)
        assert_same_bits(D.dropout_(x.clone(), 0.2, seed), want)


if __name__ == "__main__":
    triton_checks()
