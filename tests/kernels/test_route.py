"""The per-sample routing kernel (``kernels.route``) against a float64 loop over the rows.

Random ranks per adapter, rows without an adapter, feature sizes off the vector widths, 1 and 2 threads;
the errors for inconsistent inputs, and the fallback (False, y untouched) where the kernel cannot run.
"""

from __future__ import annotations

import pytest
import torch

from peftlite.kernels import route

needs_kernel = pytest.mark.skipif(route.library() is None, reason="the routing kernel needs a C compiler")


def problem(K, N, lead=(), d_in=37, d_out=53, seed=0, no_adapter=True):
    """y, x, slots, A, B, scales: K adapters of random ranks 1..16, rows spread over them (and -1)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, 17, (K,), generator=g).tolist()
    A = [torch.randn(r, d_in, generator=g) for r in ranks]
    B = [torch.randn(d_out, r, generator=g) for r in ranks]
    scales = (torch.rand(K, generator=g) * 4 - 2).tolist()
    slots = torch.randint(-1 if no_adapter else 0, K, (N,), generator=g)
    return torch.randn(N, *lead, d_out, generator=g), torch.randn(N, *lead, d_in, generator=g), slots, A, B, scales


def reference(y, x, slots, A, B, scales):
    """y + each row's own scale·(x Aᵀ) Bᵀ in float64, and a bound on the magnitude of its terms."""
    out, bound = y.double().clone(), y.double().abs()
    for n, k in enumerate(slots.tolist()):
        if k >= 0:
            a, b = A[k].double(), B[k].double()
            out[n] += scales[k] * (x[n].double() @ a.T) @ b.T
            bound[n] += abs(scales[k]) * (x[n].double().abs() @ a.abs().T) @ b.abs().T
    return out, bound


def routed(y, *args) -> torch.Tensor:
    y = y.clone()
    assert route.route_linear_(y, *args)
    return y


def assert_matches_reference(got, y, x, slots, A, B, scales):
    ref, bound = reference(y, x, slots, A, B, scales)
    err = (got.double() - ref).abs()
    assert bool((err <= 1e-5 * bound).all()), f"max error {float(err.max()):.3g}, bound {float(bound.max()):.3g}"


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["N,in", "N,T,in", "N,T1,T2,in"])
@pytest.mark.parametrize("K", [1, 3, 17])
def test_matches_float64_loop(K, lead, threads, monkeypatch):
    monkeypatch.setattr(route, "MIN_WORK", 1)  # split the rows among the threads, however little work
    torch.set_num_threads(threads)
    try:
        y, x, slots, A, B, scales = problem(K, 24, lead, seed=K)
        assert_matches_reference(routed(y, x, slots, A, B, scales), y, x, slots, A, B, scales)
    finally:
        torch.set_num_threads(1)


@needs_kernel
@pytest.mark.parametrize("d_in, d_out", [(1, 1), (130, 300), (64, 256), (300, 7)])
def test_feature_sizes_across_tiles(d_in, d_out):  # 256 outputs: the padded stride of the transposed B
    y, x, slots, A, B, scales = problem(4, 9, (2,), d_in, d_out, seed=d_out)
    assert_matches_reference(routed(y, x, slots, A, B, scales), y, x, slots, A, B, scales)


@needs_kernel
def test_all_rows_one_adapter_and_single_row():
    y, x, slots, A, B, scales = problem(3, 16, (4,), no_adapter=False)
    slots.fill_(2)
    assert_matches_reference(routed(y, x, slots, A, B, scales), y, x, slots, A, B, scales)
    y, x, slots, A, B, scales = problem(3, 1, no_adapter=False)
    assert_matches_reference(routed(y, x, slots, A, B, scales), y, x, slots, A, B, scales)


@needs_kernel
def test_rows_without_adapter_are_untouched():
    y, x, slots, A, B, scales = problem(3, 20, (3,), seed=1)
    slots[::2] = -1
    got = routed(y, x, slots, A, B, scales)
    assert torch.equal(got[slots < 0], y[slots < 0])
    assert not torch.equal(got[slots >= 0], y[slots >= 0])
    assert torch.equal(routed(y, x, torch.full_like(slots, -1), A, B, scales), y)
    assert torch.equal(routed(y, x, torch.full_like(slots, -1), [], [], []), y)  # no adapters at all


@needs_kernel
def test_empty_batch():
    y, x, slots, A, B, scales = problem(3, 0, (4,))
    assert route.route_linear_(y, x, slots, A, B, scales)


@needs_kernel
def test_deterministic_across_calls_and_threads(monkeypatch):
    monkeypatch.setattr(route, "MIN_WORK", 1)
    y, x, slots, A, B, scales = problem(17, 40, (3,), 101, 67, seed=5)
    first = routed(y, x, slots, A, B, scales)
    assert torch.equal(routed(y, x, slots, A, B, scales), first)
    torch.set_num_threads(2)
    try:  # each row's sums depend on its own data only, not on how the rows are split
        assert torch.equal(routed(y, x, slots, A, B, scales), first)
    finally:
        torch.set_num_threads(1)


def test_spans_split_the_rows_in_order_by_work(monkeypatch):
    monkeypatch.setattr(route, "MIN_WORK", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    sorted_slots = torch.tensor([-1, -1, 0, 0, 0, 1, 2, 2])  # rows without an adapter take no work
    assert route._spans(sorted_slots, torch.tensor([2, 2, 2]), per_rank=10) == [(0, 4), (4, 6), (6, 8)]
    assert route._spans(sorted_slots, torch.tensor([2, 2, 2]), per_rank=0) == [(0, 8)]  # too little work


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(slots=a["slots"][:-1]), r"slots has shape \(11,\) but the batch has 12 rows"),
    (lambda a: a.update(y=a["y"][:, :2]), r"x \(12, 3, 37\) and y \(12, 2, 53\)"),
    (lambda a: a.update(x=a["x"][:, 0]), r"x \(12, 37\) and y \(12, 3, 53\)"),
    (lambda a: a.update(slots=a["slots"].float()), "slots must hold integers .* got torch.float32"),
    (lambda a: a.update(scales=a["scales"][:2]), "3 A factors, 3 B factors and 2 scales"),
    (lambda a: a["A"].__setitem__(1, a["A"][1][:, :36]), r"adapter 1 has A \(\d+, 36\) and B \(53, \d+\)"),
    (lambda a: a["B"].__setitem__(2, a["B"][2][:50]), r"adapter 2 has A \(\d+, 37\) and B \(50, \d+\)"),
    (lambda a: a["B"].__setitem__(0, torch.zeros(53, a["A"][0].shape[0] + 1)), r"adapter 0 .* must be \(r, 37\)"),
    (lambda a: a["A"].__setitem__(0, torch.zeros(0, 37)), r"adapter 0 has A \(0, 37\)"),
], ids=["slots length", "y tokens", "x dims", "float slots", "scales count", "in", "out", "rank", "rank 0"])
def test_inconsistent_inputs_raise(change, match):
    y, x, slots, A, B, scales = problem(3, 12, (3,), seed=2)
    args = {"y": y, "x": x, "slots": slots, "A": A, "B": B, "scales": scales}
    change(args)
    y0 = args["y"].clone()
    with pytest.raises(ValueError, match=match):
        route.route_linear_(**args)
    assert torch.equal(args["y"], y0)


@needs_kernel
@pytest.mark.parametrize("bad", [3, -2])
def test_slot_out_of_range_raises(bad):
    y, x, slots, A, B, scales = problem(3, 12, seed=3)
    slots[7] = bad
    y0 = y.clone()
    with pytest.raises(ValueError, match=rf"slots\[7\] = {bad} is out of range \[-1, 3\) for 3 adapters"):
        route.route_linear_(y, x, slots, A, B, scales)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("change", [
    lambda a: a.update(x=a["x"].double()),
    lambda a: a.update(y=a["y"].double()),
    lambda a: a.update(slots=a["slots"].int()),
    lambda a: a.update(x=a["x"].transpose(0, 1).contiguous().transpose(0, 1)),
    lambda a: a["A"].__setitem__(1, a["A"][1].t().contiguous().t()),
    lambda a: a["B"].__setitem__(2, a["B"][2].half()),
], ids=["float64 x", "float64 y", "int32 slots", "strided x", "strided A", "float16 B"])
def test_what_the_kernel_does_not_take_returns_false(change):
    y, x, slots, A, B, scales = problem(3, 12, (3,), seed=4)
    args = {"y": y, "x": x, "slots": slots, "A": A, "B": B, "scales": scales}
    change(args)
    y0 = args["y"].clone()
    assert route.route_linear_(**args) is False
    assert torch.equal(args["y"], y0)


def test_falls_back_without_the_library(monkeypatch):
    y, x, slots, A, B, scales = problem(3, 12, (3,), seed=6)
    y0 = y.clone()
    monkeypatch.setattr(route, "library", lambda: None)
    assert route.route_linear_(y, x, slots, A, B, scales) is False
    assert torch.equal(y, y0)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("PEFTLITE_CPU_FUSED", "0")
    route.library.cache_clear()
    try:
        assert route.library() is None
        y, x, slots, A, B, scales = problem(3, 12, seed=7)
        y0 = y.clone()
        assert route.route_linear_(y, x, slots, A, B, scales) is False
        assert torch.equal(y, y0)
    finally:
        route.library.cache_clear()  # later tests build (or find) the real library again
