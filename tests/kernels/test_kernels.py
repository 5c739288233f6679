"""Merge/unmerge kernels against the pure-function oracle: exactness, memory bound, layouts, refusals.

Triton kernels run under the Triton interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set
before Triton is imported, and must not leak into this process). CUDA tests skip without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftlite import kernels
from peftlite.kernels import _backend, _codec, _cpu, _torch
from peftlite.kernels._bits import FORMATS, bits, from_ordinal, merged_value, ordinal, unmerged_guess

sys.path.insert(0, str(Path(__file__).parents[1]))
from _kernel_checks import (  # noqa: E402
    DTYPES,
    adversarial,
    assert_close_to_oracle,
    cycles,
    layouts,
    overflow_at,
    problem,
    same_bits,
    sequential_delta,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
HAS_FUSED = _cpu.library() is not None
needs_fused = pytest.mark.skipif(not HAS_FUSED, reason="the fused CPU pass needs a C compiler")
FUSED = [pytest.param(False, id="ops"), pytest.param(True, id="fused", marks=needs_fused)]


# ---- torch path --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_unmerge_bit_exact_over_1000_cycles(dtype):
    cycles(_torch, dtype, 1000, rows=12, cols=20, rank=4, ratio=1.0)  # fused where a C compiler is found


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.1, 1.0, 10.0])
def test_torch_merge_matches_oracle_and_unmerges_exactly(dtype, ratio):
    W, A, B, scale = problem(96, 160, 8, dtype, max(ratio, 1e-30))
    W0 = W.clone()
    rec = _torch.merge_(W, A, B, scale, block_elements=2048)  # several blocks
    assert_close_to_oracle(W, W0, A, B, scale)
    assert same_bits(W, (W0.float() + sequential_delta(A, B, scale)).to(dtype))  # documented ΔW order, one rounding
    _torch.unmerge_(W, A, B, scale, rec, block_elements=2048)
    assert same_bits(W, W0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [0.01, 0.1, 1.0])
def test_memory_bound_one_eighth_when_delta_no_larger_than_weight(dtype, ratio):
    W, A, B, scale = problem(256, 256, 16, dtype, ratio, seed=7)
    rec = _torch.merge_(W, A, B, scale)
    assert rec.nbytes <= W.numel() * W.element_size() / 8, f"{rec.bits_per_element:.2f} bits/element"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_weight_costs_no_more_than_a_raw_copy(dtype):
    W, A, B, scale = problem(64, 96, 8, dtype, 1.0)
    W.zero_()
    W0 = W.clone()
    rec = _torch.merge_(W, A, B, scale)
    assert rec.nbytes <= W.numel() * W.element_size() * 1.05  # ~15 bits/element for bf16, reported
    _torch.unmerge_(W, A, B, scale, rec)
    assert same_bits(W, W0)


def test_signed_zeros_and_subnormals_come_back_exactly():
    for dtype in DTYPES:
        tiny = torch.finfo(dtype).tiny
        vals = torch.tensor([0.0, -0.0, tiny, -tiny, tiny / 4, -tiny / 8, 1.0, -2.0]).to(dtype)
        W = vals.repeat(6, 4).reshape(12, 16)
        W0 = W.clone()
        for scale in (0.0, 1e-3, 1.0):
            A = torch.randn(2, 16)
            B = torch.randn(12, 2)
            rec = _torch.merge_(W, A, B, scale)
            _torch.unmerge_(W, A, B, scale, rec)
            assert same_bits(W, W0), (dtype, scale)


def test_float64_weights_use_plain_escapes_and_stay_exact():
    W, A, B, scale = problem(20, 30, 4, torch.float64, 1.0)
    W0 = W.clone()
    rec = _torch.merge_(W, A, B, scale)
    _torch.unmerge_(W, A, B, scale, rec)
    assert same_bits(W, W0)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_overflow_raises_and_leaves_weight_bit_identical(dtype, fused):
    W, A, B, scale = problem(64, 64, 4, dtype, 0.1)
    W[40, 7] = torch.finfo(dtype).max
    overflow_at(A, B, 40, 7, dtype)
    others = torch.arange(64) != 40  # other rows change too, so the rollback has codes and escapes to undo
    A[0, torch.arange(64) != 7] = torch.randn(63, generator=torch.Generator().manual_seed(4)) * 10
    B[others, 0] = 1e-2
    W0 = W.clone()
    with pytest.raises(kernels.NonFiniteMergeError, match=r"weight\[40, 7\]"):
        _torch.merge_(W, A, B, 1.0, block_elements=512, fused=fused)  # the bad row is in a later block
    assert same_bits(W, W0)


def test_nan_adapter_refused_with_weight_unchanged():
    W, A, B, scale = problem(16, 16, 2, torch.bfloat16, 0.1)
    A[1, 3] = float("nan")
    W0 = W.clone()
    with pytest.raises(kernels.NonFiniteMergeError):
        kernels.merge_(W, A, B, scale)
    assert same_bits(W, W0)


def test_layouts_channels_last_grouped_depthwise_transposed():
    layouts(kernels, expect="torch")


def test_wrapped_conv_model_merges_and_unmerges_exactly():
    from torch import nn

    import peftlite
    model = nn.Sequential(nn.Conv2d(6, 12, 3, groups=3), nn.Conv2d(12, 12, 3, groups=12), nn.Conv2d(12, 8, 1))
    model = model.to(memory_format=torch.channels_last)
    peftlite.wrap(model, targets="*", rank=4)
    for m in model.modules():
        if hasattr(m, "lora"):
            torch.nn.init.normal_(m.lora.default.B)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 6, 9, 9).to(memory_format=torch.channels_last)
    y = model(x)
    peftlite.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    peftlite.unmerge(model)
    for k, v in model.state_dict().items():
        assert same_bits(v, before[k]), k


# ---- the fused CPU pass: the same scheme to the bit ----------------------------------------------

@needs_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [0.0, 1e-3, 0.05, 1.0, 1e3])
def test_fused_records_are_bit_identical_to_the_torch_ops(dtype, ratio):
    """Random and adversarial weights: same merged W, same codes, same escapes; each decodes the other's."""
    for case in ("random", "adversarial"):
        W, A, B, scale = problem(48, 80, 4, dtype, max(ratio, 1e-30), seed=11)
        if case == "adversarial":
            W = adversarial(dtype, 5)  # typical entries ~1 to 1e3; the extremes stay finite for ratio ≤ 1e3
        W0, Wf = W.clone(), W.clone()
        ops = _torch.merge_(W, A, B, scale, block_elements=1024, fused=False)
        fus = _torch.merge_(Wf, A, B, scale, block_elements=1024, fused=True)
        assert same_bits(W, Wf), case
        assert torch.equal(ops.codes, fus.codes) and torch.equal(ops.chunks, fus.chunks), case
        assert torch.equal(ops.escape_index, fus.escape_index) and ops.flagged == fus.flagged, case
        assert same_bits(ops.escape_values, fus.escape_values), case
        _torch.unmerge_(W, A, B, scale, fus, block_elements=1024, fused=False)
        _torch.unmerge_(Wf, A, B, scale, ops, block_elements=1024, fused=True)
        assert same_bits(W, W0) and same_bits(Wf, W0), case


# the vector widths the C pass is built for on each kind of CPU, with the torch capability each needs
VECTOR_BUILDS = {"baseline": (None, ()), "AVX2": ("-march=x86-64-v3", ("AVX2", "AVX512")),
                 "AVX-512": ("-march=x86-64-v4", ("AVX512",))}


@needs_fused
@pytest.mark.parametrize("build", VECTOR_BUILDS)
def test_fused_records_are_the_same_at_every_vector_width(build, monkeypatch):
    """The C pass built for 4, 8 and 16 lanes (the baseline, AVX2, AVX-512, as this CPU allows) writes the
    torch ops' records, with and without per-row gains (one of them 0), rows ending in part of a vector."""
    arch, needs = VECTOR_BUILDS[build]
    if needs and torch.backends.cpu.get_cpu_capability() not in needs:
        pytest.skip(f"this CPU does not run {build}")
    monkeypatch.setattr(_cpu, "_flag_sets", lambda flags: [flags + [arch] if arch else flags])
    _cpu.library.cache_clear()
    try:
        assert _cpu.library() is not None
        for dtype in DTYPES:
            for ratio, case in ((0.05, "random"), (1.0, "random"), (1e3, "adversarial")):
                # 83 columns: rows end in part of a vector; adversarial weights are (48, 80)
                W, A, B, scale = problem(48, 80 if case == "adversarial" else 83, 4, dtype, ratio, seed=5)
                if case == "adversarial":
                    W = adversarial(dtype, 5)
                gain = torch.rand(48) + 0.5
                gain[3] = 0.0 if case == "random" else gain[3]  # inf·0 is a NaN whose payload torch's casts vary
                for g in (None, gain):
                    Wo, Wf = W.clone(), W.clone()
                    ops = _torch.merge_(Wo, A, B, scale, block_elements=1024, fused=False, gain=g)
                    fus = _torch.merge_(Wf, A, B, scale, block_elements=1024, fused=True, gain=g)
                    label = (build, dtype, ratio, g is not None)
                    assert same_bits(Wo, Wf), label
                    assert torch.equal(ops.codes, fus.codes) and torch.equal(ops.escape_index, fus.escape_index), label
                    _torch.unmerge_(Wf, A, B, scale, ops, block_elements=1024, fused=True)
                    assert same_bits(Wf, W), label
    finally:
        _cpu.library.cache_clear()


def test_blocks_run_on_threads_kept_across_calls():
    """Several threads run the blocks, in order, and the same threads call after call (their per-thread
    scratch is kept): a second call runs on threads that were alive after the first."""
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def visit(i):
            return i * i, threading.current_thread()

        first = _cpu.run_blocks(visit, list(range(64)))
        alive = set(threading.enumerate())
        second = _cpu.run_blocks(visit, list(range(64)))
        assert [v for v, _ in first] == [i * i for i in range(64)] == [v for v, _ in second]
        workers = {t for _, t in first + second}
        assert threading.current_thread() not in workers
        assert {t for _, t in second} <= alive
    finally:
        torch.set_num_threads(threads)


@needs_fused
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_merges_on_threads_of_its_own():
    """A DataLoader-style fork after the parent's pool ran: the child's merge runs (on new threads; the
    parent's do not exist there) and writes the parent's merged bits, instead of waiting on dead workers."""
    import select

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        W, A, B, scale = problem(64, 96, 4, torch.float32, 0.05, seed=3)
        Wp = W.clone()
        _torch.merge_(Wp, A, B, scale, block_elements=1024, fused=True)  # the parent's pool is up
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report whether its merge matches, then leave without running pytest's exit
            try:
                Wc = W.clone()
                _torch.merge_(Wc, A, B, scale, block_elements=1024, fused=True)
                os.write(write, b"1" if same_bits(Wc, Wp) else b"0")
            finally:
                os._exit(0)
        os.close(write)
        ready, _, _ = select.select([read], [], [], 60)
        answer = os.read(read, 1) if ready else b""
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
        assert answer == b"1", "the child's merge hung" if not ready else "the child's merge differs"
    finally:
        torch.set_num_threads(threads)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_huge_deltas_and_zero_weights_stay_exact_and_bounded(dtype):
    for ratio in (1e2, 3e3):  # std(ΔW) up to 3e3·std(W), within fp16's range
        W, A, B, scale = problem(32, 64, 4, dtype, ratio, seed=2)
        W[:, :16] = 0.0  # a zero block: huge candidate runs
        W[:, 16:20] = -0.0
        W0 = W.clone()
        rec = _torch.merge_(W, A, B, scale, fused=True)
        assert rec.nbytes <= W.numel() * W.element_size() * 1.05  # never much beyond a raw copy
        _torch.unmerge_(W, A, B, scale, rec, fused=True)
        assert same_bits(W, W0), ratio


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_weights_come_back_with_their_bits(dtype, fused):
    """A NaN weight stays NaN when merged (its payload may change: torch's own casts disagree on NaN
    payloads between vectorised and scalar code), and unmerge restores its exact bits from an escape."""
    W = adversarial(dtype, 6, nan=True)
    W.view(-1)[::97] = torch.tensor(float("nan")).to(dtype)
    W0 = W.clone()
    A, B = torch.randn(4, 80), torch.randn(48, 4)
    rec = _torch.merge_(W, A, B, 0.1, block_elements=1024, fused=fused)
    assert bool(torch.isnan(W[torch.isnan(W0)]).all())
    _torch.unmerge_(W, A, B, 0.1, rec, block_elements=1024, fused=fused)
    assert same_bits(W, W0)


def test_fused_pass_falls_back_to_torch_ops_when_it_cannot_be_built(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that always fails
    monkeypatch.setenv("PEFTLITE_CACHE", str(tmp_path))
    _cpu.library.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="peftlite.kernels"):
            assert _cpu.library() is None
        assert "_cpu.c failed" in caplog.text
        W, A, B, scale = problem(16, 24, 2, torch.bfloat16, 1.0)
        W0 = W.clone()
        rec = _torch.merge_(W, A, B, scale)  # fused=None: the torch ops, same scheme
        _torch.unmerge_(W, A, B, scale, rec)
        assert same_bits(W, W0)
        monkeypatch.setenv("PEFTLITE_CPU_FUSED", "0")
        _cpu.library.cache_clear()
        assert _cpu.library() is None
    finally:
        _cpu.library.cache_clear()  # later tests build (or find) the real library again


@needs_fused
def test_fused_refuses_what_it_cannot_run():
    W = torch.zeros(8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fused=None"):
        _torch.merge_(W, torch.zeros(2, 8), torch.zeros(8, 2), 1.0, fused=True)


# ---- the codec --------------------------------------------------------------------------------

def test_pack_unpack_roundtrip_and_bit_plane_order():
    g = torch.Generator().manual_seed(0)
    cols = 150  # three groups per row, the last one short
    width = torch.randint(0, 33, (4 * cols,), generator=g) * (torch.rand(4 * cols, generator=g) < 0.4)
    values = (torch.rand(width.numel(), generator=g, dtype=torch.float64) * (2.0 ** width)).long()
    words = _codec.pack(values, width, cols)
    assert torch.equal(_codec.unpack(words, width, cols), values)
    # the stream, bit by bit, as the layout is documented: row, group of 64 columns, plane, column
    expected = []
    for row in range(4):
        for g0 in range(0, cols, _codec.GROUP):
            lanes = range(row * cols + g0, row * cols + min(g0 + _codec.GROUP, cols))
            for b in range(max(int(width[j]) for j in lanes)):
                expected += [(int(values[j]) >> b) & 1 for j in lanes if int(width[j]) > b]
    stream = [(int(words[i // 32]) >> (i % 32)) & 1 for i in range(len(expected))]
    assert stream == expected and words.numel() == (len(expected) + 31) // 32
    assert _codec.pack(values[:0], width[:0], cols).numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_windows_against_every_value_of_the_format(dtype):
    """Against every value of the 16-bit format: width 0 only where the guess is the one original, and the
    window holds the whole run of originals that merge to W' (no escape) for ordinary and extreme deltas."""
    fmt = FORMATS[dtype]
    every = from_ordinal(torch.arange(-1 - fmt.max_finite, fmt.max_finite + 1), fmt)
    g = torch.Generator().manual_seed(1)
    held = coded = 0
    for i in range(40):
        pick = every[torch.randint(0, every.numel(), (1,), generator=g)]
        w = pick if i % 2 else torch.randn(1, generator=g).to(dtype)
        d = torch.randn(1, generator=g) * 10.0 ** float(torch.randint(-6, 3, (1,), generator=g))
        merged = merged_value(w, d)
        if not bool(torch.isfinite(merged).all()):
            continue
        hits = (bits(merged_value(every, d.expand(every.numel()))) == bits(merged)).nonzero().view(-1)
        guess = unmerged_guess(merged, d)
        width, start = _codec.window(merged, guess, d, fmt)
        if int(width) == 0:
            assert hits.numel() == 1 and same_bits(every[hits], guess)
        else:
            run = ordinal(bits(every[hits]), fmt)
            offsets = (run - start) & 0xFFFFFFFF
            coded += 1
            held += bool((offsets < 2 ** int(width)).all())
            for o in run[:3]:  # every original of the run comes back from its code
                codes, escape = _codec.encode(from_ordinal(o.view(1), fmt), guess, width, start, fmt)
                if not bool(escape):
                    assert int(ordinal(bits(_codec.decode(guess, width, start, codes, fmt)), fmt)) == int(o)
    assert coded >= 8 and held == coded, (held, coded)  # escapes are for what the estimate misses: none here


# ---- backend choice ---------------------------------------------------------------------------

def test_backend_env_override_and_fallback(monkeypatch, caplog):
    w = torch.zeros(4, 4)
    monkeypatch.setenv("PEFTLITE_KERNELS", "torch")
    assert kernels.backend_for(w) == "torch"
    monkeypatch.setenv("PEFTLITE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="PEFTLITE_KERNELS='cuda'"):
        kernels.backend_for(w)
    monkeypatch.setenv("PEFTLITE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="peftlite.kernels"):
        assert kernels.backend_for(w) == "torch"  # CPU tensor, no interpreter: loud fallback
    assert "PEFTLITE_KERNELS=triton" in caplog.text
    monkeypatch.delenv("PEFTLITE_KERNELS")
    assert kernels.backend_for(w) == "torch"
    assert _backend.CHOICES == ("torch", "triton")


def test_unmerge_refuses_a_weight_that_moved():
    W, A, B, scale = problem(8, 8, 2, torch.float32, 0.1)
    rec = kernels.merge_(W, A, B, scale)
    with pytest.raises(RuntimeError, match="merged as torch.float32 .* now torch.float64 .*move the model back"):
        kernels.unmerge_(W.double(), A, B, scale, rec)


# ---- Triton under the interpreter (subprocess) ------------------------------------------------

def _interp(*names):
    env = dict(os.environ, TRITON_INTERPRET="1", PEFTLITE_KERNELS="")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "_kernel_checks.py"), *names],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in names:
        assert f"{name}: " in proc.stdout and "FAILED" not in proc.stdout, proc.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_rounding_and_refusals():
    _interp("check_triton_rounding", "check_triton_nonfinite", "check_triton_small_buffers",
            "check_triton_special_values")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_cycles_and_layouts():
    _interp("check_triton_cycles", "check_triton_layouts", "check_triton_gain")


# ---- CUDA -------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_triton_exact_and_bounded(dtype):
    from peftlite.kernels import _triton
    for ratio in (0.01, 0.1, 1.0):
        W, A, B, scale = problem(1024, 1536, 16, dtype, ratio, device="cuda")
        W0 = W.clone()
        assert kernels.backend_for(W) == "triton"
        for _ in range(20):
            rec = _triton.merge_(W, A, B, scale)
            _triton.unmerge_(W, A, B, scale, rec)
        assert same_bits(W, W0)
        assert rec.nbytes <= W.numel() * W.element_size() / 8
    rec = _triton.merge_(W, A, B, scale)
    assert_close_to_oracle(W, W0, A, B, scale)
    _triton.unmerge_(W, A, B, scale, rec)


@cuda
def test_cuda_overflow_rolls_back():
    from peftlite.kernels import _triton
    W, A, B, _ = problem(256, 256, 4, torch.bfloat16, 0.1, device="cuda")
    W[100, 7] = torch.finfo(torch.bfloat16).max
    overflow_at(A, B, 100, 7, torch.bfloat16)
    W0 = W.clone()
    with pytest.raises(kernels.NonFiniteMergeError):
        _triton.merge_(W, A, B, 1.0)
    assert same_bits(W, W0)


@cuda
def test_cuda_torch_and_triton_records_are_not_interchangeable():
    W, A, B, scale = problem(64, 64, 4, torch.float16, 0.1, device="cuda")
    rec = _torch.merge_(W, A, B, scale)
    from peftlite.kernels import _triton
    with pytest.raises(RuntimeError, match="merged by the 'torch' kernels"):
        _triton.unmerge_(W, A, B, scale, rec)
    _torch.unmerge_(W, A, B, scale, rec)
