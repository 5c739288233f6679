"""Host side of the Triton kernels: launch, finish the flagged elements with the codec, records.

The kernel (``_triton_kernels``) does the one pass over W; the few flagged elements it lists are
encoded or decoded here with ``_codec`` (the same code as the torch backend), sorted by position so
the result does not depend on the order in which tiles ran.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import _codec
from . import _triton_kernels as K
from ._bits import FORMATS
from ._record import MergeRecord, NonFiniteMergeError

BACKEND = "triton"
BM, BN, BR = 32, 128, 16
KINDS = {torch.float32: K.FP32, torch.bfloat16: K.BF16, torch.float16: K.FP16}
SCRATCH_FRACTION = 32  # first try a list of numel/32 entries; tiles that overflow it run again
MIN_CAPACITY = 1024
_HOLE = -(2**62)  # marks list slots no tile wrote


def supports(weight: Tensor) -> bool:
    return weight.dtype in KINDS


def _launch(weight: Tensor, A: Tensor, B: Tensor, scale: float, unmerge: bool, exact: bool,
            capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Run the kernel over every tile; returns the listed elements (code, bits, d) and the overflow count.

    Index codes are the flat index for flagged elements and ``-1 - index`` for wrong unflagged guesses.
    """
    rows, cols = weight.shape
    dev = weight.device
    wbits = weight.view(torch.int32 if weight.dtype == torch.float32 else torch.int16)
    tiles_n = triton.cdiv(cols, BN)
    tiles = torch.arange(triton.cdiv(rows, BM) * tiles_n, device=dev, dtype=torch.int32)
    bad = torch.zeros(1, dtype=torch.int32, device=dev)
    capacity = capacity or max(MIN_CAPACITY, weight.numel() // SCRATCH_FRACTION)
    parts = []
    while tiles.numel():
        scr_idx = torch.full((capacity,), _HOLE, dtype=torch.int64, device=dev)
        scr_orig = torch.empty(capacity, dtype=torch.int32, device=dev)
        scr_d = torch.empty(capacity, dtype=torch.float32, device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        status = torch.zeros(tiles.numel(), dtype=torch.int32, device=dev)
        K.merge_kernel[(tiles.numel(),)](
            wbits, A, B, float(scale), rows, cols, A.shape[0],
            A.stride(0), A.stride(1), B.stride(0), B.stride(1),
            tiles, status, scr_idx, scr_orig, scr_d, counter, capacity, bad, tiles_n,
            KIND=KINDS[weight.dtype], UNMERGE=unmerge, EXACT=exact, BM=BM, BN=BN, BR=BR,
            enable_fp_fusion=False,
        )
        if not exact:
            break
        used = int(counter.item())
        n = min(used, capacity)
        written = scr_idx[:n] != _HOLE  # a tile that found the list full left its slots as holes
        parts.append((scr_idx[:n][written], scr_orig[:n][written], scr_d[:n][written]))
        tiles = tiles[status.nonzero().view(-1)]
        capacity = max(used, MIN_CAPACITY)  # enough for every pending tile at once
    idx, orig, d = (torch.cat(p) for p in zip(*parts, strict=True)) if parts else (
        torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.int32, device=dev),
        torch.empty(0, dtype=torch.float32, device=dev))
    return idx, orig, d, int(bad.item())


def _as_values(orig_bits: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float32:
        return orig_bits.view(torch.float32)
    return orig_bits.to(torch.int16).view(dtype)


def _factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    return A.to(torch.float32), B.to(torch.float32)


@torch.no_grad()
def merge_(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> MergeRecord:
    """Triton counterpart of ``_torch.merge_``; same contract, same record layout (one chunk)."""
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise NonFiniteMergeError("the adapter holds non-finite values; the weight is unchanged. Reload a "
                                  "good adapter or lower the learning rate")
    A, B = _factors(A, B)
    fmt = FORMATS[weight.dtype]
    idx, orig_bits, d, bad = _launch(weight, A, B, scale, unmerge=False, exact=True)
    order = torch.argsort(torch.where(idx >= 0, idx, -1 - idx))
    idx, orig_bits, d = idx[order], orig_bits[order], d[order]
    flagged = idx >= 0
    pos = idx[flagged]
    orig = _as_values(orig_bits, weight.dtype)
    codes, esc = _codec.encode(orig[flagged], weight.view(-1)[pos], d[flagged], fmt)
    plain = ~flagged
    esc_index = torch.cat([-1 - idx[plain], pos[esc]])
    esc_values = torch.cat([orig[plain], orig[flagged][esc]])
    order = torch.argsort(esc_index)
    record = MergeRecord(
        backend=BACKEND, dtype=weight.dtype, device=weight.device, shape=tuple(weight.shape), codes=codes,
        chunks=torch.tensor([0, codes.numel()], dtype=torch.int64), escape_index=esc_index[order],
        escape_values=esc_values[order], flagged=int(pos.numel()),
    )
    if bad:
        unmerge_(weight, A, B, scale, record)
        raise NonFiniteMergeError(
            f"merging would make {bad} weight value(s) non-finite (W + ΔW overflows {weight.dtype}); the "
            "weight is unchanged. Lower the adapter scale or merge in a wider dtype"
        )
    return record


@torch.no_grad()
def unmerge_(weight: Tensor, A: Tensor, B: Tensor, scale: float, record: MergeRecord | None) -> None:
    """Triton counterpart of ``_torch.unmerge_``."""
    if record is not None:
        record.check_matches(weight, BACKEND, "unmerge")
    if weight.numel() == 0:
        return
    A, B = _factors(A, B)
    fmt = FORMATS[weight.dtype]
    idx, merged_bits, d, _ = _launch(weight, A, B, scale, unmerge=True, exact=record is not None)
    if record is None:
        return
    order = torch.argsort(idx)
    idx, merged, d = idx[order], _as_values(merged_bits[order], weight.dtype), d[order]
    if idx.numel():
        weight.view(-1)[idx] = _codec.decode(record.codes, merged, d, fmt)
    if record.escape_index.numel():
        weight.view(-1)[record.escape_index] = record.escape_values


