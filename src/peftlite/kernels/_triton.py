"""Host side of the Triton kernels: launch the one pass, rerun tiles that found a buffer full, records.

The kernel (``_triton_kernels.codec_kernel``) decides every element's window code (``_codec``) and escape
in registers, so merge and unmerge are each one pass over W. A merge record holds the codes (``codes``: int32
words, each element's ``width`` bits back to back, each tile's from the bit ``chunks[tile]``, an int64 offset
kept on the device) and the escapes (originals the code would not give back). Code order follows the order in
which tiles reserved their bits, so records of equal merges may differ in layout, never in what they decode to.

Merges with a per-row gain (DoRA) do not run here: ``kernels.merge_`` routes them to the torch backend
(``_torch``, torch ops on the weight's device), whose record then names "torch" for the unmerge.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import _triton_kernels as K
from ._record import MergeRecord, NonFiniteMergeError

BACKEND = "triton"
BM, BN, BR, WARPS = 32, 128, 16, 8
KINDS = {torch.float32: K.FP32, torch.bfloat16: K.BF16, torch.float16: K.FP16}
CODE_FRACTION = 32  # the first code buffer holds W's bits / 32 (1 bit per fp32 element); tiles beyond rerun
MIN_CODE_BITS = 1024  # ... but at least this many bits
MIN_ESCAPES = 256  # the first escape list holds max(this, numel / 4096) entries


def supports(weight: Tensor) -> bool:
    return weight.dtype in KINDS


def _as_fp32(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    return A.to(torch.float32), B.to(torch.float32)


def _bits(weight: Tensor) -> Tensor:
    return weight.view(torch.int32 if weight.dtype == torch.float32 else torch.int16)


def _tiles(rows: int, cols: int) -> tuple[int, int]:
    """(number of tiles, tiles per row of tiles)."""
    tiles_n = triton.cdiv(cols, BN)
    return triton.cdiv(rows, BM) * tiles_n, tiles_n


def _launch(weight, A, B, scale, tiles, tile_off, status, buf, cap_bits, esc_idx, esc_bits, ctr, *,
            unmerge: bool, exact: bool) -> None:
    rows, cols = weight.shape
    K.codec_kernel[(tiles.numel(),)](
        _bits(weight), A, B, float(scale), rows, cols, A.shape[0],
        A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        tiles, tile_off, status, buf, cap_bits, esc_idx, esc_bits, esc_idx.numel(), ctr, _tiles(rows, cols)[1],
        KIND=KINDS[weight.dtype], UNMERGE=unmerge, EXACT=exact, BM=BM, BN=BN, BR=BR,
        num_warps=WARPS, enable_fp_fusion=False,
    )


def _as_values(orig_bits: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float32:
        return orig_bits.view(torch.float32)
    return orig_bits.to(torch.int16).view(dtype)


@torch.no_grad()
def merge_(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> MergeRecord:
    """Triton counterpart of ``_torch.merge_``: same contract, its own record layout (per-tile offsets).

    Raises:
        NonFiniteMergeError: non-finite merged values (W restored exactly). The caller (``kernels.merge_``'s
            callers in ``merging``) has checked the adapter is finite.
    """
    A, B = _as_fp32(A, B)
    rows, cols = weight.shape
    dev = weight.device
    n_tiles, _ = _tiles(rows, cols)
    tile_off = torch.zeros(n_tiles, dtype=torch.int64, device=dev)
    cap_bits = max(MIN_CODE_BITS, weight.numel() * weight.element_size() * 8 // CODE_FRACTION)
    buf = torch.zeros(triton.cdiv(cap_bits, 32), dtype=torch.int32, device=dev)
    ctr = torch.zeros(5, dtype=torch.int64, device=dev)  # bits, escapes, coded elements, overflows, pending
    tiles = torch.arange(n_tiles, dtype=torch.int32, device=dev)
    esc_cap = max(MIN_ESCAPES, weight.numel() // 4096)
    idx_parts, bit_parts = [], []
    while tiles.numel():
        esc_idx = torch.full((esc_cap,), -1, dtype=torch.int64, device=dev)
        esc_bits = torch.empty(esc_cap, dtype=torch.int32, device=dev)
        status = torch.zeros(2 * tiles.numel(), dtype=torch.int32, device=dev)
        _launch(weight, A, B, scale, tiles, tile_off, status, buf, cap_bits, esc_idx, esc_bits, ctr,
                unmerge=False, exact=True)
        used, n_esc, _, _, pending = ctr.tolist()
        n_esc = min(n_esc, esc_cap)
        keep = esc_idx[:n_esc] != -1 if pending else slice(None)  # pending tiles leave holes
        idx_parts.append(esc_idx[:n_esc][keep])
        bit_parts.append(esc_bits[:n_esc][keep])
        if not pending:
            break
        # rerun the pending tiles: bits from the first one that did not fit, room for all of them
        waiting = status[0::2].nonzero().view(-1)
        need = status[0::2][waiting].to(torch.int64) - 1
        base = tile_off[tiles[waiting].long()]
        short = base + need > cap_bits
        restart = min(used, int(base[short].min())) if bool(short.any()) else used
        new_cap = restart + int(need.sum())
        if new_cap > cap_bits:
            grown = torch.zeros(triton.cdiv(new_cap, 32), dtype=torch.int32, device=dev)
            grown[:triton.cdiv(restart, 32)] = buf[:triton.cdiv(restart, 32)]
            buf, cap_bits = grown, new_cap
        ctr[0], ctr[1], ctr[4] = restart, 0, 0
        esc_cap = max(esc_cap, int(status[1::2].sum()))
        tiles = tiles[waiting]
    used, _, coded, bad, _ = ctr.tolist()
    words = triton.cdiv(used, 32)
    codes = buf[:words].clone() if words < buf.numel() else buf
    del buf
    esc_index = torch.cat(idx_parts)
    record = MergeRecord(
        backend=BACKEND, dtype=weight.dtype, device=dev, shape=(rows, cols), codes=codes, chunks=tile_off,
        escape_index=esc_index, escape_values=_as_values(torch.cat(bit_parts), weight.dtype), flagged=coded,
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
    """Triton counterpart of ``_torch.unmerge_``: one pass; then the escapes are written."""
    if weight.numel() == 0:
        return
    A, B = _as_fp32(A, B)
    rows, cols = weight.shape
    dev = weight.device
    n_tiles, _ = _tiles(rows, cols)
    tiles = torch.arange(n_tiles, dtype=torch.int32, device=dev)
    i64, i32 = (torch.zeros(1, dtype=t, device=dev) for t in (torch.int64, torch.int32))  # unused arguments
    if record is None:
        _launch(weight, A, B, scale, tiles, i64, i32, i32, 0, i64, i32, i64, unmerge=True, exact=False)
        return
    codes = record.codes if record.codes.numel() else i32
    _launch(weight, A, B, scale, tiles, record.chunks, i32, codes, 0, i64, i32, i64, unmerge=True, exact=True)
    if record.escape_index.numel():
        weight.view(-1)[record.escape_index] = record.escape_values
