"""Exact merge/unmerge with torch ops, blocked over rows so that no W-sized temporary is made.

Per block of rows (about ``BLOCK_ELEMENTS`` elements, so the temporaries stay in cache):

    merge     d = delta(A, B_blk, scale) in fp32;  W_blk <- round(W_blk + d)   (one add, one rounding)
              guess = round(W_blk' - d); each element's window (``_codec.window``) and its offset in it,
              packed by bit planes; escapes where the window does not hold the original
    unmerge   d as above; the same windows; W_blk <- guess, or window start + code; escapes written

``d`` comes from the same function on the same blocks in both directions, so it is bit-identical.
Weights of other float dtypes (fp64) keep a plain escape list: every element whose guess is wrong.

With a per-row gain (DoRA, ``_gain``): ``W_blk <- round(fp32(fp32(W_blk + d)·g))``, the guess is
``round(W_blk'/g - d)``, the windows are computed with the gain, and rows with ``g == 0`` are kept
verbatim in the record.

On CPU tensors each block runs as one C function (``_cpu``: ``d`` in the same order, then the windows,
codes and escapes), blocks on all of torch's threads, when a C compiler is at hand; it produces the same
records to the bit, so ``fused`` only changes the speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _codec, _cpu
from ._bits import FORMATS, merged_value, unmerged_guess
from ._gain import check_gain
from ._record import MergeRecord, NonFiniteMergeError

BACKEND = "torch"
BLOCK_ELEMENTS = 1 << 18  # elements per block: 1 MiB of fp32 temporaries
Rows = Callable[[int, int], Tensor]  # (start, stop) -> ΔW's rows [start, stop), scaled; see ``kron_rows``


def _blocks(rows: int, cols: int, block_elements: int):
    step = max(1, block_elements // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _in_delta_dtype(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
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


def kron_rows(W1: Tensor, W2: Tensor, scale: float) -> Rows:
    """The rows of ``scale·(W1 ⊗ W2)`` (LoKr), each element ``(W1[l, m]·W2[k, j])·scale``: two roundings in a
    fixed order on any device.  W1: (out_l, in_m), W2: (out_k, c2), in the delta dtype."""
    out_k, s = W2.shape[0], torch.tensor(scale, dtype=W1.dtype)

    def rows(start: int, stop: int) -> Tensor:
        i = torch.arange(start, stop, device=W1.device)
        block = W1[i // out_k][:, :, None] * W2[i % out_k][:, None, :]  # (rows, in_m, c2)
        return block.reshape(stop - start, -1).mul_(s)

    return rows


def summed_rows(parts: list[Rows]) -> Rows:
    """The rows of a sum of ΔWs, added in the order given."""
    def rows(start: int, stop: int) -> Tensor:
        d = parts[0](start, stop)
        for part in parts[1:]:
            d += part(start, stop)
        return d

    return rows


def pair_rows(A: Tensor, B: Tensor, scale: float) -> Rows:
    """The rows of ``scale·B@A`` as ``delta`` forms them, for a sum with other kinds' rows."""
    A, B = _in_delta_dtype(A, B)
    return lambda start, stop: delta(A, B[start:stop], scale)


class _Builder:
    """Collects the per-block codes and escapes of one merge, and, with a gain, keeps the gain and the
    rows it zeroes (taken from ``weight`` before anything is written)."""

    def __init__(self, weight: Tensor, gain: Tensor | None):
        self.weight = weight
        self.gain = gain
        self.raw_index = None if gain is None else (gain == 0).nonzero().view(-1)
        self.raw_values = None if gain is None else weight[self.raw_index].clone()
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
        """The record of the first ``shape[0]`` rows (all of them, or the blocks merged so far)."""
        w = self.weight
        cat = lambda ts, dtype: torch.cat(ts) if ts else torch.empty(0, dtype=dtype, device=w.device)
        rec = MergeRecord(
            backend=BACKEND, dtype=w.dtype, device=w.device, shape=shape,
            codes=cat(self.codes, torch.int32), chunks=torch.tensor(self.chunks, dtype=torch.int64),
            escape_index=cat(self.esc_index, torch.int64), escape_values=cat(self.esc_values, w.dtype),
            flagged=self.flagged,
        )
        if self.gain is not None:
            within = self.raw_index < shape[0]
            rec.gain, rec.raw_index, rec.raw_values = (self.gain[:shape[0]], self.raw_index[within],
                                                       self.raw_values[within])
        return rec

    def restore_raw(self) -> None:
        """Write the rows kept verbatim back into the weight."""
        if self.raw_index is not None and self.raw_index.numel():
            self.weight[self.raw_index] = self.raw_values


def _fused(weight: Tensor, factors: torch.dtype, fused: bool | None) -> bool:
    if fused is None:
        return FORMATS.get(weight.dtype) is not None and _cpu.usable(weight, factors)
    if fused and not _cpu.usable(weight, factors):
        raise RuntimeError(f"the fused CPU pass cannot run for a {weight.dtype} weight on {weight.device} "
                           f"with {factors} adapters (it needs a contiguous fp32/bf16/fp16 CPU weight, fp32 "
                           "adapters and a C compiler); pass fused=None")
    return fused


def _c_factors(A: Tensor | None, B: Tensor | None, scale: float, rows: Rows | None, start: int, stop: int) -> tuple:
    """The C pass's ΔW arguments for one block: ``(A, B_rows, scale)`` of a pair, or the block's ``d`` itself."""
    if rows is None:
        return A, B[start:stop], scale, None
    return None, None, 0.0, rows(start, stop).contiguous()


def _merge_fused(weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float, rows: Rows | None,
                 block_elements: int, out: _Builder) -> MergeRecord:
    """``merge_`` by the fused C pass, blocks on all of torch's threads."""
    n_rows, cols = weight.shape
    gain = out.gain
    spans = list(_blocks(n_rows, cols, block_elements))

    def merge_block(span: tuple[int, int]) -> _cpu.Block:
        start, stop = span
        a, b, s, d = _c_factors(A, B, scale, rows, start, stop)
        return _cpu.merge_block(weight[start:stop], a, b, s, None if gain is None else gain[start:stop], d=d)

    done = _cpu.run_blocks(merge_block, spans)
    failed = [(start, blk) for (start, _), blk in zip(spans, done) if blk.overflow >= 0]
    if failed:  # an overflowing block restored itself; take the others back out, then report the first
        _cpu.run_blocks(lambda i: _unmerge_block(weight, A, B, scale, rows, spans[i], done[i], gain),
                        [i for i, blk in enumerate(done) if blk.overflow < 0])
        out.restore_raw()  # rows with gain 0 have no codes: the C pass leaves them to the caller
        start, blk = failed[0]
        row, col = start + blk.overflow // cols, blk.overflow % cols
        raise _overflow_error(weight, row, col, weight[row, col].item(), gain)
    for (start, _), blk in zip(spans, done):
        out.block(start * cols, blk.codes, blk.esc_index, blk.esc_values, blk.flagged)
    return out.record((n_rows, cols))


def _unmerge_block(weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float, rows: Rows | None,
                   span: tuple[int, int], blk: _cpu.Block, gain: Tensor | None) -> None:
    start, stop = span
    a, b, s, d = _c_factors(A, B, scale, rows, start, stop)
    _cpu.unmerge_block(weight[start:stop], a, b, s, blk.codes, None if gain is None else gain[start:stop], d=d)
    weight[start:stop].view(-1)[blk.esc_index] = blk.esc_values


def _window(merged: Tensor, guess: Tensor, d: Tensor, g_flat: Tensor | None, live: Tensor | None, fmt):
    """``_codec.window`` of a block (flat), with no code for rows of gain 0 (``live`` false: kept verbatim)."""
    width, begin = _codec.window(merged.view(-1), guess, d.view(-1), fmt, g_flat)
    return (width if live is None else torch.where(live, width, 0)), begin


def _overflow_error(weight: Tensor, row: int, col: int, value: float,
                    gain: Tensor | None = None) -> NonFiniteMergeError:
    what = f"{value!r} + ΔW" if gain is None else f"gain[{row}] = {gain[row].item()!r} times ({value!r} + ΔW)"
    return NonFiniteMergeError(
        f"merging would make weight[{row}, {col}] non-finite ({what} overflows {weight.dtype}); "
        "the weight is unchanged. Lower the adapter scale or merge in a wider dtype"
    )


def _row_gain(gain: Tensor | None, start: int, stop: int, cols: int) -> tuple[Tensor | None, Tensor | None]:
    """The block's gains as a column, and flat, one per element: (rows_blk, 1), (rows_blk·cols,); or Nones."""
    if gain is None:
        return None, None
    g = gain[start:stop, None]
    return g, g.expand(stop - start, cols).reshape(-1)


@torch.no_grad()
def merge_(weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float, block_elements: int = BLOCK_ELEMENTS,
           fused: bool | None = None, gain: Tensor | None = None, rows: Rows | None = None) -> MergeRecord:
    """Fold ``scale·B@A`` into the (rows, cols) row-major matrix ``weight`` in place.

    Args:
        rows: instead of a pair, ΔW's rows from a deterministic function (``kron_rows``, ``summed_rows``),
            scaled, in fp32 (fp64 for an fp64 weight); A, B and scale are then unused.
        gain: (rows,) float32 per-row gains (DoRA): ``W' = round(g_i·(W_ij + ΔW_ij))``; rows with gain 0
            are kept verbatim in the record. None: ``W' = round(W + ΔW)``.
    Returns:
        The record that makes ``unmerge_`` bit-exact.
    Raises:
        NonFiniteMergeError: a non-finite gain (nothing written), or some merged value would be non-finite
            where W was finite; W is restored bit-exactly before raising.
        ValueError: a gain of the wrong shape, dtype or device.
    """
    n_rows, cols = weight.shape
    fmt = FORMATS.get(weight.dtype)
    if rows is None:
        A, B = _in_delta_dtype(A, B)
    if gain is not None:
        check_gain(weight, gain)
        gain = gain.detach().clone()  # the record's own: the caller's magnitudes may train on
    out = _Builder(weight, gain)
    if _fused(weight, _delta_dtype(weight, A, rows), fused):
        A, B = (None, None) if rows is not None else (A.contiguous(), B.contiguous())
        return _merge_fused(weight, A, B, scale, rows, block_elements, out)
    for start, stop in _blocks(n_rows, cols, block_elements):
        blk = weight[start:stop]
        d = delta(A, B[start:stop], scale) if rows is None else rows(start, stop)
        g, g_flat = _row_gain(gain, start, stop, cols)
        orig = blk.clone()
        if g is None:
            blk.add_(d)  # in fp32, rounded once to W's dtype
        else:
            blk.copy_(merged_value(orig, d, g) if fmt is not None else (orig + d) * g)  # fp64: in fp64
        if not bool(torch.isfinite(blk).all()):
            bad = torch.isfinite(orig) & ~torch.isfinite(blk)
            if bad.any():
                blk.copy_(orig)
                unmerge_(weight[:start], A, None if B is None else B[:start], scale, out.record((start, cols)),
                         block_elements, False, rows)
                pos = int(bad.view(-1).nonzero()[0])
                row, col = start + pos // cols, pos % cols
                raise _overflow_error(weight, row, col, orig.view(-1)[pos].item(), gain)
        guess = unmerged_guess(blk, d, g).view(-1)
        o = orig.view(-1)
        live = None if g is None else g_flat != 0  # rows with gain 0 are kept verbatim instead
        if fmt is None:  # no codec for this dtype: every wrong guess is an escape
            wrong = guess != o
            lost = (wrong if live is None else wrong & live).nonzero().view(-1)
            out.block(start * cols, None, lost, o[lost], 0)
            continue
        width, begin = _window(blk, guess, d, g_flat, live, fmt)
        codes, escape = _codec.encode(o, guess, width, begin, fmt)
        lost = (escape if live is None else escape & live).nonzero().view(-1)
        out.block(start * cols, _codec.pack(codes, width, cols), lost, o[lost], int((width > 0).sum()))
    return out.record((n_rows, cols))


def _delta_dtype(weight: Tensor, A: Tensor | None, rows: Rows | None) -> torch.dtype:
    """The dtype ΔW is computed in: the pair's (fp32, or fp64), or for ``rows`` fp32 but for an fp64 weight."""
    if rows is None:
        return A.dtype
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@torch.no_grad()
def unmerge_(weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float, record: MergeRecord | None,
             block_elements: int = BLOCK_ELEMENTS, fused: bool | None = None, rows: Rows | None = None) -> None:
    """Take ``scale·B@A`` back out of ``weight`` in place; bit-exact given the merge's record.

    A gain merge's record holds its gains (and the rows of gain 0), so unmerge takes no gain. With
    ``record=None`` (merged state loaded from a state_dict) the result is ``round(W' - ΔW)``, which can
    differ from the original W in the last bit where merging crossed into a coarser binade (and a gain
    merge cannot be undone at all without its record).
    """
    n_rows, cols = weight.shape
    if n_rows == 0:
        return
    fmt = FORMATS.get(weight.dtype)
    if rows is None:
        A, B = _in_delta_dtype(A, B)
    gain = None if record is None else record.gain
    if record is not None and _fused(weight, _delta_dtype(weight, A, rows), fused):
        A, B = (None, None) if rows is not None else (A.contiguous(), B.contiguous())
        chunks = record.chunks.tolist()

        def block(i_span):
            i, (start, stop) = i_span
            a, b, s, d = _c_factors(A, B, scale, rows, start, stop)
            _cpu.unmerge_block(weight[start:stop], a, b, s, record.codes[chunks[i]:chunks[i + 1]],
                               None if gain is None else gain[start:stop], d=d)

        _cpu.run_blocks(block, list(enumerate(_blocks(n_rows, cols, block_elements))))
    else:
        _unmerge_ops(weight, A, B, scale, record, fmt, block_elements, rows)
    if record is not None and record.escape_index.numel():
        weight.view(-1)[record.escape_index] = record.escape_values
    if record is not None and record.raw_rows:
        weight[record.raw_index] = record.raw_values


def _unmerge_ops(weight: Tensor, A: Tensor | None, B: Tensor | None, scale: float, record: MergeRecord | None, fmt,
                 block_elements: int, rows: Rows | None) -> None:
    n_rows, cols = weight.shape
    gain = None if record is None else record.gain
    for i, (start, stop) in enumerate(_blocks(n_rows, cols, block_elements)):
        blk = weight[start:stop]
        d = delta(A, B[start:stop], scale) if rows is None else rows(start, stop)
        g, g_flat = _row_gain(gain, start, stop, cols)
        guess = unmerged_guess(blk, d, g)
        if record is None or fmt is None:
            blk.copy_(guess)  # rows with gain 0 are written afterwards, from the record
            continue
        width, begin = _window(blk, guess.view(-1), d, g_flat, None if g is None else g_flat != 0, fmt)
        words = record.codes[int(record.chunks[i]):int(record.chunks[i + 1])]
        codes = _codec.unpack(words, width, cols)
        blk.view(-1).copy_(_codec.decode(guess.view(-1), width, begin, codes, fmt))
