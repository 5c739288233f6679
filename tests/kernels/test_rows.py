"""Merges whose ΔW comes row block by row block from a deterministic function (``kernels.merge_rows_``: LoKr's
Kronecker rows, sums of kinds): bit-exact unmerge, the C pass equal to the torch ops, overflow rollback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peftlite import kernels
from peftlite.kernels import NonFiniteMergeError, _cpu, _torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from _kernel_checks import DTYPES, same_bits  # noqa: E402

needs_fused = pytest.mark.skipif(_cpu.library() is None, reason="the fused CPU pass needs a C compiler")


def kron_problem(out_l, out_k, in_m, c2, dtype, ratio, seed=0):
    """W (out_l·out_k, in_m·c2), W1, W2, and the scale with std(scale·W1 ⊗ W2) = ratio·std(W)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_l * out_k, in_m * c2, generator=g).to(dtype)
    W1, W2 = torch.randn(out_l, in_m, generator=g), torch.randn(out_k, c2, generator=g)
    return W, W1, W2, ratio / float(torch.kron(W1, W2).std())


def test_kron_rows_are_each_one_product_then_the_scale():
    _, W1, W2, scale = kron_problem(3, 5, 4, 7, torch.float32, 1.0)
    w1, w2 = W1.numpy(), W2.numpy()
    want = (w1[:, None, :, None] * w2[None, :, None, :]).reshape(15, 28) * np.float32(scale)  # numpy fp32
    rows = kernels.kron_rows(W1, W2, scale)
    got = torch.cat([rows(0, 4), rows(4, 15)])
    assert same_bits(got, torch.from_numpy(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_unmerge_is_bit_exact_over_1000_cycles(dtype):
    W, W1, W2, scale = kron_problem(4, 3, 5, 4, dtype, 1.0)
    W0 = W.clone()
    rows = kernels.kron_rows(W1, W2, scale)
    for _ in range(1000):
        rec = kernels.merge_rows_(W, rows)
        kernels.unmerge_rows_(W, rows, rec)
    assert same_bits(W, W0)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.01, 1.0, 10.0])
def test_the_c_pass_makes_the_torch_ops_records_from_given_rows(dtype, ratio):
    W, W1, W2, scale = kron_problem(8, 12, 6, 20, dtype, max(ratio, 1e-30), seed=3)
    lora = _torch.pair_rows(torch.randn(3, 120), torch.randn(96, 3), 0.1)
    rows = kernels.summed_rows([kernels.kron_rows(W1, W2, scale), lora])  # a sum of kinds, in order
    W0 = W.clone()
    merged, records = [], []
    for fused in (False, True):
        w = W0.clone()
        records.append(_torch.merge_(w, None, None, 0.0, block_elements=1024, fused=fused, rows=rows))
        merged.append(w)
    assert same_bits(merged[0], merged[1])
    assert same_bits(merged[0], (W0.float() + rows(0, 96)).to(dtype))  # one rounding of W + ΔW
    assert torch.equal(records[0].codes, records[1].codes)
    assert torch.equal(records[0].escape_index, records[1].escape_index)
    for fused, rec in zip((True, False), records, strict=True):  # each unmerges the other's record
        w = merged[0].clone()
        _torch.unmerge_(w, None, None, 0.0, rec, block_elements=1024, fused=fused, rows=rows)
        assert same_bits(w, W0)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_fused)], ids=["ops", "fused"])
def test_a_rows_merge_that_would_overflow_leaves_the_weight_as_it_was(fused):
    W, W1, W2, scale = kron_problem(8, 8, 4, 16, torch.float16, 1.0)
    W1[50 // 8, 7 // 16] = 1e4  # this element's ΔW pushes it past fp16's range
    W[50, 7] = 65000.0 * float(torch.sign(W2[50 % 8, 7 % 16]))
    W0 = W.clone()
    with pytest.raises(NonFiniteMergeError, match=r"weight\[50, 7\]"):
        _torch.merge_(W, None, None, 0.0, block_elements=256, fused=fused, rows=kernels.kron_rows(W1, W2, scale))
    assert same_bits(W, W0)
