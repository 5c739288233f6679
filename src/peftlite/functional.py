"""The math of low-rank adapters, as pure tensor functions: the definition of what peftlite computes.

Layers, kernels and tests all call these; every fast path (the autograd functions in ``layers``, the
merge kernels) is checked against them.

Shapes (for a Conv2d, ``fan_in = in_channels // groups * kh * kw``; for a Linear, ``fan_in = in``):
    W: (out, in/groups, kh, kw) or (out, in)
    A: (r, fan_in)         B: (out, r)
    delta_weight(A, B, W.shape) == (B @ A).reshape(W.shape)

For grouped convs this is still one rank-r factorisation of the whole ``(out, fan_in)`` matrix, so
``W + scale * ΔW`` is a valid grouped weight and the adapted layer is exactly a convolution with it.

Conv geometry lives in one type, ``ConvGeometry``, and padding follows one rule, ``pad_input``: the
input is padded here whenever ``F.conv2d``'s own padding cannot express the conv's (a non-zero
``padding_mode``, an asymmetric ``'same'``), and the conv that is left always has integer padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ConvGeometry:
    """Everything that fixes what a Conv2d computes, besides its tensors."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str  # ints, or 'same' / 'valid'
    dilation: tuple[int, int]
    groups: int
    padding_mode: str  # zeros, reflect, replicate, circular

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   padding, tuple(conv.dilation), conv.groups, conv.padding_mode)

    @property
    def fan_in(self) -> int:
        kh, kw = self.kernel_size
        return self.in_channels // self.groups * kh * kw

    def explicit_padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding, as ``F.pad`` takes it; 'same' may be asymmetric."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def output_pixels(self, x_shape: torch.Size) -> int:
        """N·H'·W' of the conv's output for an input of ``x_shape`` (N, C, H, W); plain ints, no tensors."""
        left, right, top, bottom = self.explicit_padding()
        size = x_shape[0]
        for n, pad, k, s, d in zip(x_shape[-2:], (top + bottom, left + right), self.kernel_size, self.stride,
                                   self.dilation, strict=True):
            size *= (n + pad - d * (k - 1) - 1) // s + 1
        return size


def pad_input(x: Tensor, geom: ConvGeometry) -> tuple[Tensor, ConvGeometry]:
    """The one padding rule: ``x`` padded as far as ``F.conv2d``'s padding argument cannot do it.

    Returns:
        ``(x, geom)``: the input, padded for a non-zero ``padding_mode`` or an asymmetric ``'same'``
        (exactly as ``nn.Conv2d`` and ``F.conv2d`` pad inside), and the geometry of the conv left to
        run on it, whose ``padding`` is a pair of ints and ``padding_mode`` is ``'zeros'``.
    """
    if geom.padding_mode == "zeros" and not isinstance(geom.padding, str):
        return x, geom
    left, right, top, bottom = geom.explicit_padding()
    if geom.padding_mode == "zeros" and left == right and top == bottom:
        return x, dataclasses.replace(geom, padding=(top, left))
    mode = "constant" if geom.padding_mode == "zeros" else geom.padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode), dataclasses.replace(geom, padding=(0, 0),
                                                                                padding_mode="zeros")


def delta_weight(A: Tensor, B: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """ΔW = B @ A, reshaped to the base weight's shape; computed in fp32 (or fp64 when given fp64).

    Args:
        A: (r, fan_in). B: (out, r). shape: the base weight's shape, ``out * fan_in`` elements.
    Returns:
        ΔW of ``shape``, in float32 (float64 if A or B is float64).
    """
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    return (B.to(dtype) @ A.to(dtype)).reshape(shape)


def hadamard_delta(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> Tensor:
    """LoHa's ΔW = (B1 @ A1) ⊙ (B2 @ A2) as a matrix (out, fan_in): the reference.  A_k: (r, fan_in), B_k: (out, r)."""
    return (B1 @ A1) * (B2 @ A2)


def hadamard_pair(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> tuple[Tensor, Tensor]:
    """LoHa's ΔW as one low-rank pair ``(A, B)`` of rank r1·r2, ``B @ A = (B1 @ A1) ⊙ (B2 @ A2)``.

    ΔW_ij = Σ_ab B1_ia B2_ib · A1_aj A2_bj: A's rows are the products of a row of A1 and a row of A2 (the
    column-wise Khatri–Rao product), B's columns the products of a column of B1 and one of B2. So every
    path that takes a LoRA pair (the layers' forwards without forming ΔW, the exact merge kernels, per-sample
    routing) takes a LoHa adapter too.  -> A: (r1·r2, fan_in), B: (out, r1·r2).
    """
    return khatri_rao_rows(A1, A2), khatri_rao_rows(B1.t(), B2.t()).t()


def khatri_rao_rows(X: Tensor, Y: Tensor) -> Tensor:
    """Every product of a row of X and a row of Y, X's index major: (m, n), (p, n) -> (m·p, n)."""
    return (X[:, None, :] * Y[None, :, :]).reshape(X.shape[0] * Y.shape[0], X.shape[1])


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's LoKr split of ``dim`` into ``(m, n)``, ``m · n = dim``, as its ``decompose_factor`` defines it.

    ``factor > 0`` dividing ``dim``: ``(factor, dim // factor)`` as given (so ``(128, 64)`` gives ``(64, 2)``).
    Otherwise the divisor pair nearest √dim with ``m ≤ factor`` (``-1``: no bound), smaller first:
    256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127), 128 with factor 4 -> (4, 32).
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:  # the next divisor up, while it stays within the bound (it passes √dim once, then stops)
        d = m + 1
        while dim % d:
            d += 1
        if d > bound:
            break
        m, n = d, dim // d
    return (m, n) if m <= n else (n, m)


def tucker_in(core: Tensor, factor: Tensor) -> Tensor:
    """A Tucker core with its input factor contracted in, as one flat factor (computed in fp64).

    Args:
        core: (r, r', kh, kw).
        factor: (r', c).
    Returns:
        (r, c·kh·kw): ``out[a, (c, h, w)] = Σ_b core[a, b, h, w] · factor[b, c]``, in at least fp32.
    """
    out = torch.einsum("abhw,bc->achw", core.double(), factor.double())  # (r, c, kh, kw)
    return out.reshape(core.shape[0], -1).to(torch.promote_types(core.dtype, torch.float32))


def tucker_factor(core: Tensor, factor: Tensor) -> Tensor:
    """A Tucker form's input side as one flat factor, for training in that form (``AdapterSpec.tucker``).

    ``out[a, (c, hw)] = Σ_b core[a, b, hw] · factor[b, c]``, summed over b in order, each product and sum
    rounded on its own (as the merge kernels' ΔW): the pair's A is then the same bits in a merge and in
    its unmerge, whatever the thread count.

    Args:
        core: (r, r', kh·kw). factor: (r', c).
    Returns:
        (r, c·kh·kw), the kernel's elements inner, as a conv's flat weight has them.
    """
    out = core[:, 0, None, :] * factor[0][None, :, None]  # (r, c, kh·kw)
    for b in range(1, core.shape[1]):
        out = out + core[:, b, None, :] * factor[b][None, :, None]
    return out.reshape(core.shape[0], -1)


def kron_delta(W1: Tensor, W2: Tensor) -> Tensor:
    """LoKr's ΔW = W1 ⊗ W2 as a matrix (out_l·out_k, in_m·c2).  W1: (out_l, in_m), W2: (out_k, c2).

    For a Conv2d, W2's columns are (in_n, kh, kw) flattened: the kernel sits on W2, and the result is the
    (out, in/groups·kh·kw) matrix of the weight. Each element is one product ``W1[l, m] · W2[k, j]``.
    """
    return (W1[:, None, :, None] * W2[None, :, None, :]).reshape(W1.shape[0] * W2.shape[0],
                                                                   W1.shape[1] * W2.shape[1])


def kron_linear(x: Tensor, W1: Tensor, W2: Tensor) -> Tensor:
    """``x @ (W1 ⊗ W2)ᵀ`` without forming the Kronecker product: two small products on x read as
    (N, in_m, in_n).  x: (..., in_m·in_n) -> (..., out_l·out_k); W1: (out_l, in_m), W2: (out_k, in_n).

    The order with fewer multiply-adds is taken: W2 first (N·in_m·out_k·(in_n + out_l)) or W1 first
    (N·out_l·in_n·(in_m + out_k)).
    """
    (out_l, in_m), (out_k, in_n) = W1.shape, W2.shape
    X = x.reshape(-1, in_m, in_n)
    W1, W2 = W1.to(x.dtype), W2.to(x.dtype)
    if in_m * out_k * (in_n + out_l) <= out_l * in_n * (in_m + out_k):
        Y = torch.matmul(W1, X @ W2.t())  # (N, in_m, out_k) -> (N, out_l, out_k)
    else:
        Y = torch.matmul(W1, X) @ W2.t()  # (N, out_l, in_n) -> (N, out_l, out_k)
    return Y.reshape(*x.shape[:-1], out_l * out_k)


def kron_conv2d(x: Tensor, W1: Tensor, W2: Tensor, geom: ConvGeometry) -> Tensor:
    """``conv(x, W1 ⊗ W2)`` for an ungrouped conv without forming the product: W2's conv on each of the in_m
    channel blocks of x as its own image, then W1 mixing the blocks.

    ``x`` is already padded by ``pad_input`` and ``geom`` is the geometry it returned (groups 1).
    W1: (out_l, in_m). W2: (out_k, in_n·kh·kw). Returns (N, out_l·out_k, H', W'), unscaled.
    """
    (out_l, in_m), out_k = W1.shape, W2.shape[0]
    N, C, H, W = x.shape
    kernel = W2.to(x.dtype).reshape(out_k, C // in_m, *geom.kernel_size)
    z = F.conv2d(x.reshape(N * in_m, C // in_m, H, W), kernel, None, geom.stride, geom.padding, geom.dilation)
    h, w = z.shape[-2:]
    y = torch.matmul(W1.to(x.dtype), z.reshape(N, in_m, out_k * h * w))  # (N, out_l, out_k·H'·W')
    return y.reshape(N, out_l * out_k, h, w)


def kron_linear_delta(x: Tensor, W1: Tensor, W2: Tensor, scale: float, dropout: float = 0.0,
                      training: bool = False) -> Tensor:
    """LoKr's branch of a linear: ``scale · dropout(x) @ (W1 ⊗ W2)ᵀ``.  x: (..., in) -> (..., out)."""
    if dropout > 0.0 and training:
        x = F.dropout(x, dropout, True)
    y = kron_linear(x, W1, W2)  # a new tensor, which its backward does not read: scaled in place
    return y.mul_(scale) if not isinstance(scale, Tensor) else y * scale


def kron_conv2d_delta(x: Tensor, W1: Tensor, W2: Tensor, scale: float, geom: ConvGeometry, dropout: float = 0.0,
                      training: bool = False) -> Tensor:
    """LoKr's branch of a conv, ``scale · conv(dropout(x), W1 ⊗ W2)``, for an unpadded input (padded here).

    Ungrouped: ``kron_conv2d``, without forming the product. Grouped: the conv with the formed ΔW (a
    group's channels are not the in_m blocks the split reads).
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, dropout, True)
    xp, g = pad_input(x, geom)
    if g.groups == 1:
        return scale * kron_conv2d(xp, W1, W2, g)
    kh, kw = g.kernel_size
    delta = kron_delta(W1, W2).to(x.dtype).reshape(g.out_channels, g.in_channels // g.groups, kh, kw)
    return scale * F.conv2d(xp, delta, None, g.stride, g.padding, g.dilation, g.groups)


def effective_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``W + scale * ΔW`` in W's dtype, summed in fp32 and rounded once (as merge does)."""
    delta = delta_weight(A, B, weight.shape)
    return (weight.to(delta.dtype) + scale * delta).to(weight.dtype)


def add_delta(weight: Tensor, delta: Tensor) -> Tensor:
    """``W + ΔW`` for a scaled ΔW matrix (out, fan_in), in W's dtype and shape, summed in fp32 or wider."""
    dtype = torch.promote_types(delta.dtype, torch.float32)
    return (weight.to(dtype) + delta.to(dtype).reshape(weight.shape)).to(weight.dtype)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """The base convolution exactly as ``nn.Conv2d`` computes it, padding_mode included."""
    x, g = pad_input(x, geom)
    return F.conv2d(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)


def conv2d_delta(x: Tensor, A: Tensor, B: Tensor, geom: ConvGeometry) -> Tensor:
    """The adapter branch of a conv through activations: ``conv(x, ΔW)`` without forming ΔW.

    ``x`` is already padded by ``pad_input`` and ``geom`` is the geometry it returned. A grouped conv
    runs A once per group (width ``groups * r``), then B as a grouped 1x1 conv.

    Returns:
        (N, out, H', W'), unscaled.
    """
    r = A.shape[0]
    kh, kw = geom.kernel_size
    a = A.to(x.dtype).reshape(r, geom.in_channels // geom.groups, kh, kw)
    if geom.groups > 1:
        a = a.repeat(geom.groups, 1, 1, 1)  # (groups*r, in/groups, kh, kw)
    h = F.conv2d(x, a, None, geom.stride, geom.padding, geom.dilation, geom.groups)  # (N, groups*r, H', W')
    b = B.to(x.dtype).reshape(geom.out_channels, r, 1, 1)
    return F.conv2d(h, b, None, 1, 0, 1, geom.groups)  # (N, out, H', W')


def conv2d_dropout_delta(x: Tensor, A: Tensor, B: Tensor, scale: float, geom: ConvGeometry,
                         dropout: float = 0.0, training: bool = False) -> Tensor:
    """``scale * conv(dropout(x), ΔW)`` for an unpadded input: dropout first, then the conv's padding."""
    if dropout > 0.0 and training:
        x = F.dropout(x, dropout, True)
    xp, g = pad_input(x, geom)
    return scale * conv2d_delta(xp, A, B, g)


def lora_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                geom: ConvGeometry, dropout: float = 0.0, training: bool = False) -> Tensor:
    """Adapted conv through activations: base conv plus ``scale * conv(dropout(x), ΔW)``."""
    return conv2d(x, weight, bias, geom) + conv2d_dropout_delta(x, A, B, scale, geom, dropout, training)


def lora_conv2d_merged(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                       geom: ConvGeometry) -> Tensor:
    """Adapted conv through the merged weight: ``conv(x, W + scale * ΔW)``; no dropout here."""
    return conv2d(x, effective_weight(weight, A, B, scale), bias, geom)


def linear_delta(x: Tensor, A: Tensor, B: Tensor, scale: float, dropout: float = 0.0,
                 training: bool = False) -> Tensor:
    """The adapter branch of a linear: ``scale * (dropout(x) @ Aᵀ) @ Bᵀ``.  x: (..., in) -> (..., out)."""
    if dropout > 0.0 and training:
        x = F.dropout(x, dropout, True)
    h = F.linear(x, A.to(x.dtype))  # (..., r)
    return scale * F.linear(h, B.to(x.dtype))


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                dropout: float = 0.0, training: bool = False) -> Tensor:
    """Adapted linear: ``x @ Wᵀ + b + scale * (dropout(x) @ Aᵀ) @ Bᵀ``.  x: (..., in) -> (..., out)."""
    return F.linear(x, weight, bias) + linear_delta(x, A, B, scale, dropout, training)


# ---- several adapters on one weight ----------------------------------------------------------------

def fold(As: list[Tensor], Bs: list[Tensor], scales: list[float]) -> tuple[Tensor, Tensor, float]:
    """Several adapters on one weight as one low-rank pair: ``Σ_k scale_k · B_k @ A_k = B @ A · scale``.

    One adapter with a Python scale is returned as it is, ``(A, B, scale)``, so a single adapter merges
    (and unmerges) as it always has. Several are concatenated along the rank, each B scaled by its own
    factor (in fp32, or fp64 for fp64 factors), with scale 1; so is a scale given as a tensor.

    Args:
        As: (r_k, fan_in) each. Bs: (out, r_k) each. scales: one factor per adapter (weight · alpha / rank),
            a float or a 0-d tensor.
    Returns:
        ``(A, B, scale)`` with A: (Σ r_k, fan_in), B: (out, Σ r_k), scale a float.
    """
    if len(As) == 1 and not isinstance(scales[0], Tensor):
        return As[0], Bs[0], float(scales[0])
    dtype = torch.promote_types(torch.promote_types(As[0].dtype, Bs[0].dtype), torch.float32)
    A = torch.cat([a.to(dtype) for a in As])
    B = torch.cat([b.to(dtype) * s for b, s in zip(Bs, scales, strict=True)], dim=1)
    return A, B, 1.0


def combine_linear(As: list[Tensor], Bs: list[Tensor], factors: list[float]) -> tuple[Tensor, Tensor]:
    """PEFT's ``add_weighted_adapter(combination_type="linear")``: equal ranks, A and B each summed.

    ``A = Σ sign(f_k)·sqrt(|f_k|)·A_k`` and ``B = Σ sqrt(|f_k|)·B_k`` with ``f_k = weight_k · scale_k``,
    applied with scale 1. The rank stays r, and ``B @ A`` holds cross terms ``B_j A_k``: it is not the
    weighted sum of the ΔW (use ``combine_cat`` for that).
    """
    ranks = {a.shape[0] for a in As}
    if len(ranks) != 1:
        raise ValueError(f"combine how='linear' needs equal ranks, got {sorted(ranks)}; use how='cat' or 'svd'")
    root = [abs(f) ** 0.5 for f in factors]
    A = sum(a.float() * (r if f >= 0 else -r) for a, r, f in zip(As, root, factors, strict=True))
    B = sum(b.float() * r for b, r in zip(Bs, root, strict=True))
    return A, B


def combine_cat(As: list[Tensor], Bs: list[Tensor], factors: list[float]) -> tuple[Tensor, Tensor]:
    """The weighted sum of the ΔW, exactly: ranks concatenated, ``A = cat(f_k·A_k)``, ``B = cat(B_k)``, scale 1."""
    return torch.cat([a.float() * f for a, f in zip(As, factors, strict=True)]), torch.cat([b.float() for b in Bs], 1)


def combine_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` approximation of one layer's weighted ΔW (out, fan_in), as ``(A, B, rel_error)``.

    ``B = U_r · diag(S_r)``, ``A = Vh_r`` (applied with scale 1); ``rel_error`` is the relative Frobenius
    error ``‖ΔW - B A‖ / ‖ΔW‖`` (0 for a zero ΔW).
    """
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, S.numel())
    B, A = (U[:, :rank] * S[:rank]), Vh[:rank]
    total = float(S.square().sum())
    rest = float(S[rank:].square().sum())
    return A.float(), B.float(), (rest / total) ** 0.5 if total > 0 else 0.0


# ---- DoRA: weight-decomposed adapters ----------------------------------------------------------------

ROWS_PER_CHUNK = 256  # rows of W converted to fp32 at a time for 16-bit weights (a bounded temporary)


def dora_norms(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Row norms ``‖W_i + scale·(B A)_i‖`` of the adapted weight, without forming it.  -> (out,), fp32 or fp64.

    ``‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ``: one product ``W Aᵀ`` (out × r) and an r × r Gram
    matrix, never an (out × fan_in) tensor. A 16-bit W is read ``ROWS_PER_CHUNK`` rows at a time in fp32.

    Args:
        weight: (out, ...) the base weight; its rows are flattened to fan_in. A: (r, fan_in). B: (out, r).
    """
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    W = weight.reshape(weight.shape[0], -1)
    A, B = A.to(dtype), B.to(dtype)
    if W.dtype == dtype:
        sq, P = torch.linalg.vector_norm(W, dim=1).square(), W @ A.t()  # (out,), (out, r)
    else:
        parts = [W[i:i + ROWS_PER_CHUNK].to(dtype) for i in range(0, W.shape[0], ROWS_PER_CHUNK)]
        sq = torch.cat([torch.linalg.vector_norm(p, dim=1).square() for p in parts])
        P = torch.cat([p @ A.t() for p in parts])
    gram = A @ A.t()  # (r, r)
    n2 = sq + 2 * scale * (B * P).sum(1) + scale * scale * ((B @ gram) * B).sum(1)
    return n2.clamp(min=0).sqrt()


def dora_gain(magnitude: Tensor, norms: Tensor) -> Tensor:
    """The per-row factor ``m / ‖W + s·ΔW‖``, defined as 0 on a row whose adapted weight is all zero."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, magnitude / safe, torch.zeros_like(magnitude))


def dora_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float, magnitude: Tensor) -> Tensor:
    """The dense DoRA weight ``m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖_row`` in W's dtype (a W-sized reference)."""
    V = weight.to(torch.promote_types(weight.dtype, torch.float32)) + scale * delta_weight(A, B, weight.shape)
    norms = torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1)
    g = dora_gain(magnitude.to(V.dtype), norms.detach())
    return (V * g.view(-1, *([1] * (V.dim() - 1)))).to(weight.dtype)


# ---- principal-component initialisations (PiSSA, OLoRA) ----------------------------------------------

def pissa_pair(weight: Tensor, rank: int, scale: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """PiSSA's starting pair: ``scale · B0 @ A0 = U_r S_r V_rᵀ``, the rank-r principal part of ``weight``.

    ``S_r / scale`` is split as its square root between the factors (``B0 = U_r √(S_r/scale)``,
    ``A0 = √(S_r/scale) V_rᵀ``), as PEFT's ``init_lora_weights="pissa"``. ``niter``: PEFT's
    ``"pissa_niter_N"``, a randomized SVD (``torch.svd_lowrank``, N subspace iterations) instead of the exact one.

    Args:
        weight: (out, fan_in), fp32 or fp64 (a conv kernel as one matrix, as A reads it).
        rank: r <= min(out, fan_in).
    Returns:
        ``(A0, B0)``: (r, fan_in) and (out, r), in ``weight``'s dtype.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        U, S, V = torch.svd_lowrank(weight, q=rank, niter=niter)
        Vh = V.t()
    root = (S / scale).sqrt()  # (r,)
    return (root[:, None] * Vh).contiguous(), (U * root).contiguous()


def olora_pair(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """OLoRA's starting pair: ``B0 = Q[:, :r]``, ``A0 = R[:r]`` from ``weight = Q R`` (not divided by the
    scale, as PEFT's ``init_lora_weights="olora"``).  weight: (out, fan_in) -> ``(A0, B0)``: (r, fan_in), (out, r)."""
    Q, R = torch.linalg.qr(weight)
    return R[:rank].contiguous(), Q[:, :rank].contiguous()


def shared_pair(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """A principal-init adapter as a plain pair on the ORIGINAL weight: ``[A; A0]`` (2r, fan_in) and
    ``[B, -B0]`` (out, 2r), so that ``scale·B' A' = scale·(B A - B0 A0)`` (PEFT's conversion for sharing)."""
    return torch.cat([A, A0.to(A.dtype)]), torch.cat([B, -B0.to(B.dtype)], dim=1)
