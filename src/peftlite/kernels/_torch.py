"""Exact merge/unmerge with torch ops, blocked over rows so that no W-sized temporary is made.

Per block of rows (about ``BLOCK_ELEMENTS`` elements, so the temporaries stay in cache):

    merge     d = delta(A, B_blk, scale) in fp32;  W_blk <- round(W_blk + d)   (one add, one rounding)
              guess = round(W_blk' - d); flag = may_lose(guess, W_blk')
              codes for the flagged elements; escapes where an unflagged guess is not the original
    unmerge   d as above; W_blk <- guess; flagged elements decoded from their codes; escapes written

``d`` comes from the same function on the same blocks in both directions, so it is bit-identical.
Weights of other float dtypes (fp64) keep a plain escape list: every element whose guess is wrong.

On CPU tensors each block runs as one C function (``_cpu``: ``d`` in the same order, then the flag, runs,
codes and escapes), blocks on all of torch's threads, when a C compiler is at hand; it produces the same
records to the bit, so ``fused`` only changes the speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _codec, _cpu
from ._bits import FORMATS, bits, may_lose, unmerged_guess
from ._record import MergeRecord, NonFiniteMergeError

BACKEND = "torch"
BLOCK_ELEMENTS = 1 << 18  # elements per block: 1 MiB of fp32 temporaries


def _blocks(rows: int, cols: int, block_elements: int):
    step = max(1, block_elements // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """A and B in the fp32 (fp64 for fp64 adapters) the deltas are computed in."""
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    return A.to(dtype), B.to(dtype)


def delta(A: Tensor, B_rows: Tensor, scale: float) -> Tensor:
    """scale·(B_rows @ A), the one definition both directions (and the fused C pass) use.  (rows_blk, cols)

    The rank is summed in order, k = 0..r-1, every product and sum rounded on its own (no fused
    multiply-add, no blocked reduction), then scaled: a matmul library's order is its own and may change
    with the thread count, and exact unmerge needs the merge's ΔW to the bit.
    """
    d = B_rows[:, :1] * A[:1]
    for k in range(1, A.shape[0]):
        d += B_rows[:, k:k + 1] * A[k:k + 1]
    return d.mul_(torch.tensor(scale, dtype=d.dtype))


class _Builder:
    """Collects the per-block codes and escapes of one merge."""

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.codes: list[Tensor] = []
        self.chunks = [0]
        self.esc_index: list[Tensor] = []
        self.esc_values: list[Tensor] = []
        self.flagged = 0

    def block(self, start_flat: int, codes: Tensor | None, index: Tensor, values: Tensor,
              flagged: int) -> None:
        if codes is not None:
            self.codes.append(codes)
            self.chunks.append(self.chunks[-1] + codes.numel())
        if index.numel():
            self.esc_index.append(index + start_flat)
            self.esc_values.append(values)
        self.flagged += flagged

    def record(self, shape: tuple[int, int]) -> MergeRecord:
        w = self.weight
        cat = lambda ts, dtype: torch.cat(ts) if ts else torch.empty(0, dtype=dtype, device=w.device)
        return MergeRecord(
            backend=BACKEND, dtype=w.dtype, device=w.device, shape=shape,
            codes=cat(self.codes, torch.int32), chunks=torch.tensor(self.chunks, dtype=torch.int64),
            escape_index=cat(self.esc_index, torch.int64), escape_values=cat(self.esc_values, w.dtype),
            flagged=self.flagged,
        )


def _fused(weight: Tensor, factors: torch.dtype, fused: bool | None) -> bool:
    if fused is None:
        return FORMATS.get(weight.dtype) is not None and _cpu.usable(weight, factors)
    if fused and not _cpu.usable(weight, factors):
        raise RuntimeError(f"the fused CPU pass cannot run for a {weight.dtype} weight on {weight.device} "
                           f"with {factors} adapters (it needs a contiguous fp32/bf16/fp16 CPU weight, fp32 "
                           "adapters and a C compiler); pass fused=None")
    return fused


def _merge_fused(weight: Tensor, A: Tensor, B: Tensor, scale: float, block_elements: int) -> MergeRecord:
    """``merge_`` by the fused C pass, blocks on all of torch's threads."""
    rows, cols = weight.shape
    spans = list(_blocks(rows, cols, block_elements))
    done = _cpu.run_blocks(lambda s: _cpu.merge_block(weight[s[0]:s[1]], A, B[s[0]:s[1]], scale), spans)
    failed = [(start, blk) for (start, _), blk in zip(spans, done) if blk.overflow >= 0]
    if failed:  # an overflowing block restored itself; take the others back out, then report the first
        _cpu.run_blocks(lambda i: _unmerge_block(weight, A, B, scale, spans[i], done[i]),
                        [i for i, blk in enumerate(done) if blk.overflow < 0])
        start, blk = failed[0]
        row, col = start + blk.overflow // cols, blk.overflow % cols
        raise _overflow_error(weight, row, col, weight[row, col].item())
    out = _Builder(weight)
    for (start, _), blk in zip(spans, done):
        out.block(start * cols, blk.codes, blk.esc_index, blk.esc_values, blk.flagged)
    return out.record((rows, cols))


def _unmerge_block(weight: Tensor, A: Tensor, B: Tensor, scale: float, span: tuple[int, int],
                   blk: _cpu.Block) -> None:
    start, stop = span
    _cpu.unmerge_block(weight[start:stop], A, B[start:stop], scale, blk.codes)
    weight[start:stop].view(-1)[blk.esc_index] = blk.esc_values


def _overflow_error(weight: Tensor, row: int, col: int, value: float) -> NonFiniteMergeError:
    return NonFiniteMergeError(
        f"merging would make weight[{row}, {col}] non-finite ({value!r} + ΔW overflows {weight.dtype}); "
        "the weight is unchanged. Lower the adapter scale or merge in a wider dtype"
    )


@torch.no_grad()
def merge_(weight: Tensor, A: Tensor, B: Tensor, scale: float,
           block_elements: int = BLOCK_ELEMENTS, fused: bool | None = None) -> MergeRecord:
    """Fold ``scale·B@A`` into the (rows, cols) row-major matrix ``weight`` in place.

    Returns:
        The record that makes ``unmerge_`` bit-exact.
    Raises:
        NonFiniteMergeError: some merged value would be non-finite where W was finite; W is restored
            bit-exactly before raising.
    """
    rows, cols = weight.shape
    fmt = FORMATS.get(weight.dtype)
    A, B = _factors(A, B)
    if _fused(weight, A.dtype, fused):
        return _merge_fused(weight, A.contiguous(), B.contiguous(), scale, block_elements)
    out = _Builder(weight)
    for start, stop in _blocks(rows, cols, block_elements):
        blk = weight[start:stop]
        d = delta(A, B[start:stop], scale)
        orig = blk.clone()
        blk.add_(d)  # in fp32, rounded once to W's dtype
        if not bool(torch.isfinite(blk).all()):
            bad = torch.isfinite(orig) & ~torch.isfinite(blk)
            if bad.any():
                blk.copy_(orig)
                unmerge_(weight[:start], A, B[:start], scale, out.record((start, cols)), block_elements, False)
                pos = int(bad.view(-1).nonzero()[0])
                raise _overflow_error(weight, start + pos // cols, pos % cols, orig.view(-1)[pos].item())
        guess = unmerged_guess(blk, d).view(-1)
        o = orig.view(-1)
        if fmt is None:  # no codec for this dtype: every wrong guess is an escape
            lost = (guess != o).nonzero().view(-1)
            out.block(start * cols, None, lost, o[lost], 0)
            continue
        flag = may_lose(guess, blk, d, fmt)
        plain = (~flag & (bits(guess) != bits(o))).nonzero().view(-1)
        pos = flag.nonzero().view(-1)
        codes, esc = _codec.encode(o[pos], blk.view(-1)[pos], d.view(-1)[pos], fmt)
        lost = torch.cat([plain, pos[esc]]).sort().values
        out.block(start * cols, codes, lost, o[lost], pos.numel())
    return out.record((rows, cols))


@torch.no_grad()
def unmerge_(weight: Tensor, A: Tensor, B: Tensor, scale: float, record: MergeRecord | None,
             block_elements: int = BLOCK_ELEMENTS, fused: bool | None = None) -> None:
    """Take ``scale·B@A`` back out of ``weight`` in place; bit-exact given the merge's record.

    With ``record=None`` (merged state loaded from a state_dict) the result is ``round(W' - ΔW)``, which
    can differ from the original W in the last bit where merging crossed into a coarser binade.
    """
    rows, cols = weight.shape
    if rows == 0:
        return
    fmt = FORMATS.get(weight.dtype)
    A, B = _factors(A, B)
    if record is not None and _fused(weight, A.dtype, fused):
        A, B = A.contiguous(), B.contiguous()
        chunks = record.chunks.tolist()

        def block(i_span):
            i, (start, stop) = i_span
            _cpu.unmerge_block(weight[start:stop], A, B[start:stop], scale, record.codes[chunks[i]:chunks[i + 1]])

        _cpu.run_blocks(block, list(enumerate(_blocks(rows, cols, block_elements))))
    else:
        _unmerge_ops(weight, A, B, scale, record, fmt, block_elements)
    if record is not None and record.escape_index.numel():
        weight.view(-1)[record.escape_index] = record.escape_values


def _unmerge_ops(weight: Tensor, A: Tensor, B: Tensor, scale: float, record: MergeRecord | None, fmt,
                 block_elements: int) -> None:
    rows, cols = weight.shape
    for i, (start, stop) in enumerate(_blocks(rows, cols, block_elements)):
        blk = weight[start:stop]
        d = delta(A, B[start:stop], scale)
        guess = unmerged_guess(blk, d)
        if record is None or fmt is None:
            blk.copy_(guess)
            continue
        flag = may_lose(guess, blk, d, fmt)
        pos = flag.nonzero().view(-1)
        merged = blk.view(-1)[pos]
        blk.copy_(guess)
        if pos.numel():
            words = record.codes[int(record.chunks[i]):int(record.chunks[i + 1])]
            blk.view(-1)[pos] = _codec.decode(words, merged, d.view(-1)[pos], fmt)
