"""Exact merge/unmerge with torch ops, blocked over rows so that no W-sized temporary is made.

Merge, per block of rows:   d = scale·(B_blk @ A) in fp32;  W_blk <- round(W_blk + d)  (one rounding)
                            record where round(W_blk' - d) != W_blk (bits lost to a coarser binade)
Unmerge, per block of rows: W_blk <- round(W_blk' - d), then write back the recorded originals.

d is computed by the same function, on the same blocks, at merge and at unmerge, so it is bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._record import MergeRecord, NonFiniteMergeError

BLOCK_ELEMENTS = 1 << 18  # rows per block = this // cols: 1 MiB fp32 temporaries


def _blocks(rows: int, cols: int):
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _delta(A: Tensor, B_rows: Tensor, scale: float) -> Tensor:
    """scale·(B_rows @ A) in fp32 (fp64 for fp64 weights): the one definition both directions use."""
    dtype = torch.promote_types(torch.promote_types(A.dtype, B_rows.dtype), torch.float32)
    return torch.mm(B_rows.to(dtype), A.to(dtype)).mul_(scale)


@torch.no_grad()
def merge_(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> MergeRecord:
    """Fold ``scale·B@A`` into the (rows, cols) contiguous matrix ``weight`` in place.

    Raises:
        NonFiniteMergeError: some merged value would be non-finite where W was finite; W is restored
            bit-exactly before raising.
    """
    rows, cols = weight.shape
    flat_index, flat_values = [], []
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    for start, stop in _blocks(rows, cols):
        blk = weight[start:stop]
        d = _delta(A, B[start:stop], scale)
        orig = blk.clone()
        blk.add_(d)  # computed in fp32, rounded once to W's dtype
        bad = torch.isfinite(orig) & ~torch.isfinite(blk)
        if bad.any():
            blk.copy_(orig)
            unmerge_(weight[:start], A, B[:start], scale, _record(weight[:start], flat_index, flat_values))
            pos = int(bad.view(-1).nonzero()[0])
            raise NonFiniteMergeError(
                f"merging would make weight[{start + pos // cols}, {pos % cols}] non-finite "
                f"({orig.view(-1)[pos].item()!r} + ΔW overflows {weight.dtype}); the weight is unchanged. "
                "Lower the adapter scale or merge in a wider dtype"
            )
        back = torch.sub(blk, d).to(weight.dtype)  # what unmerge will compute
        lost = (back != orig).view(-1).nonzero().view(-1)
        if lost.numel():
            flat_values.append(orig.view(-1)[lost])
            flat_index.append((lost + start * cols).to(index_dtype))
    return _record(weight, flat_index, flat_values, index_dtype)


def _record(weight: Tensor, index: list, values: list, index_dtype=torch.int64) -> MergeRecord:
    empty_i = torch.empty(0, dtype=index_dtype, device=weight.device)
    empty_v = torch.empty(0, dtype=weight.dtype, device=weight.device)
    return MergeRecord(
        backend="torch", dtype=weight.dtype, device=weight.device, shape=tuple(weight.shape),
        index=torch.cat(index) if index else empty_i, values=torch.cat(values) if values else empty_v,
    )


@torch.no_grad()
def unmerge_(weight: Tensor, A: Tensor, B: Tensor, scale: float, record: MergeRecord | None) -> None:
    """Take ``scale·B@A`` back out of ``weight`` in place; bit-exact given the merge's record.

    With ``record=None`` (merged state loaded from a state_dict) the result is ``round(W' - ΔW)``, which
    can differ from the original W in the last bit where merging crossed into a coarser binade.
    """
    rows, cols = weight.shape
    if rows == 0:
        return
    if record is not None:
        if record.backend != "torch":
            raise RuntimeError(f"weight was merged by the {record.backend!r} backend; unmerge it with that backend")
        record.check_matches(weight, "unmerge")
    for start, stop in _blocks(rows, cols):
        weight[start:stop].sub_(_delta(A, B[start:stop], scale))
    if record is not None and record.index.numel():
        weight.view(-1)[record.index.long()] = record.values
