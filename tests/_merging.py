"""Checks every adapter kind's tests share: merged outputs match and unmerge gives W back to the bit; per-sample
routing computes each row as its adapter alone."""

from __future__ import annotations

import torch
from torch import nn

import peftlite

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}  # merged against unmerged outputs


def assert_merge_cycles(model: nn.Module, x: torch.Tensor, cycles: int = 50) -> None:
    """``cycles`` merge / forward / unmerge rounds: the merged outputs equal the unmerged ones within the dtype's
    rounding, and afterwards every state_dict tensor is bit-identical to before."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        for _ in range(cycles):
            peftlite.merge(model)
            merged = model(x)
            peftlite.unmerge(model)
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(merged.float(), want.float(), rtol=tol, atol=tol)
    for k, v in model.state_dict().items():
        assert v.stride() == before[k].stride(), k  # the layout kept (a merge writes in place)
        assert torch.equal(v.contiguous().view(torch.uint8), before[k].contiguous().view(torch.uint8)), k  # to the bit


def assert_rows_route_as_alone(model: nn.Module, x: torch.Tensor, rows: list) -> None:
    """``peftlite.per_sample(model, rows)`` gives each row of ``x`` what ``peftlite.use`` of its adapter alone does."""
    with torch.no_grad(), peftlite.per_sample(model, rows):
        routed = model(x)
    for i, name in enumerate(rows):
        peftlite.use(model, name)
        with torch.no_grad():
            torch.testing.assert_close(routed[i], model(x[i:i + 1])[0], rtol=1e-6, atol=1e-6)
