"""The unmerged adapted Conv2d as autograd functions that compute only what the adapter's backward needs.

With ``a`` = A as ``G·r`` kxk filters (A repeated once per group), ``h = conv(x, a)`` (N, G·r, H', W'),
``B h`` = B as a grouped 1x1 conv, g = ∂L/∂y and ``gh = scale · Bᵀ g`` (N, G·r, H', W'):

    y = conv(x, W) + b + scale · B h
    ∂A = Σ_groups (weight-gradient of conv(x, a) at gh)      ∂B = scale · Σ_pixels g hᵀ
    ∂W = weight-gradient of conv(x, ·) at g, only when W trains (then ∂A, ∂B come from it: r-wide products)

Three ways to run it, chosen per call by ``conv.training_path`` (``conv.inference_path`` without gradients):

- ``activations``: forward ``conv(x, W)`` and ``h``, then ``y += scale · B h`` in place (no output-sized
  temporaries); ``∂x = convᵀ(g, W) + convᵀ(gh, a)``, the second added in place for a 1x1 conv.
- ``merged``: forward one conv with ``W + scale·ΔW`` (as the weight path does), and ``∂x`` one
  transposed conv with it; the adapter's gradients come from ``h`` (recomputed) and ``gh``, never from
  the full weight-gradient conv that autograd on the weight path would run.
- ``dense`` (training only): forward as ``merged``; the adapter's gradients come from the full weight
  gradient (``∂A = scale·Bᵀ ∂W``, ``∂B = scale·∂W Aᵀ``), cheapest for a tiny ``fan_in`` (depthwise
  convs, whose weight gradient on CPU has its own kernel, ``kernels.depthwise``).

Both save x (once), references to the parameters, and (activations) h: the merged weight and A's
filters are formed again in backward, never kept for the step. Under
autocast the convs run in the autocast dtype, as ``F.conv2d`` would. They take the input already padded
by ``functional.pad_input`` and the geometry it returns (integer padding, zeros mode). The reference they
must match is ``functional.lora_conv2d``.

With dropout active in training the layer runs ``dropped_conv2d``: the adapter's input is dropped by a
seeded mask (``kernels.dropout``) that backward regenerates, so no dropped copy of x is kept; on the
activations path it is formed a slice of samples at a time (``dropout.slices``), never as an x-sized temporary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional
from ..functional import ConvGeometry
from ..kernels import depthwise, dropout


def _is_pointwise(g: ConvGeometry) -> bool:
    """A 1x1 conv with stride 1 and no padding: per sample, a matmul over channels."""
    return g.kernel_size == (1, 1) and g.stride == (1, 1) and g.padding == (0, 0)


# Plain reshapes here, not einops: these run on every call, and einops' per-call overhead (~7 µs a call,
# ~40 µs per adapted conv per training step) was measurable on ResNet-50 (benchmarks/run.py).
def _filters(A: Tensor, c: ConvGeometry, dtype: torch.dtype) -> Tensor:
    """A (r, fan_in) as the conv's ``(G·r, in/G, kh, kw)`` filters: the same r filters for every group."""
    a = A.to(dtype).reshape(A.shape[0], c.in_channels // c.groups, *c.kernel_size)
    return a.repeat(c.groups, 1, 1, 1) if c.groups > 1 else a


def _conv_a(x: Tensor, a: Tensor, c: ConvGeometry) -> Tensor:
    return F.conv2d(x, a, None, c.stride, c.padding, c.dilation, c.groups)  # (N, G·r, H', W')


def _flat(t: Tensor) -> Tensor | None:
    """(N, C, H, W) as (N, C, H·W) when that is a view of a contiguous NCHW tensor, else None."""
    return t.view(t.shape[0], t.shape[1], -1) if t.is_contiguous() else None


def _add_low_rank_(y: Tensor, h: Tensor, B: Tensor, scale: float, groups: int) -> None:
    """``y += scale · B h`` in place (B as a grouped 1x1 conv).  y: (N, out, H', W'), h: (N, G·r, H', W')."""
    yf, hf = _flat(y), _flat(h)
    if groups == 1 and yf is not None and hf is not None:
        yf.baddbmm_(B.expand(y.shape[0], *B.shape), hf, alpha=scale)  # per sample (out, r) @ (r, H'·W')
    else:
        y.add_(F.conv2d(h, B.reshape(B.shape[0], -1, 1, 1), None, 1, 0, 1, groups), alpha=scale)


def _to_rank(g: Tensor, B: Tensor, groups: int) -> Tensor:
    """``Bᵀ g``, the gradient reaching h (unscaled).  g: (N, out, H', W') -> (N, G·r, H', W')."""
    gf = _flat(g)
    if groups == 1 and gf is not None:
        bt = B.t().contiguous().expand(g.shape[0], -1, -1)  # (N, r, out)
        return torch.bmm(bt, gf).view(g.shape[0], B.shape[1], *g.shape[2:])
    out, r = B.shape
    bt = B.reshape(groups, out // groups, r).transpose(1, 2).reshape(groups * r, out // groups, 1, 1)
    return F.conv2d(g, bt, None, 1, 0, 1, groups)


def _grad_B(g: Tensor, h: Tensor, B: Tensor, groups: int) -> Tensor:
    """``Σ_pixels g hᵀ`` (unscaled), the 1x1 conv's weight gradient.  -> (out, r)."""
    gf, hf = _flat(g), _flat(h)
    if groups == 1 and gf is not None and hf is not None:
        return torch.bmm(hf, gf.transpose(1, 2)).sum(0).t()  # (r, out) per sample: MKL's faster orientation
    out, r = B.shape
    _, gB, _ = torch.ops.aten.convolution_backward(
        g, h, B.reshape(out, r, 1, 1), None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [False, True, False])
    return gB.reshape(out, r)


def _is_strided_pointwise(g: ConvGeometry) -> bool:
    """A 1x1 conv with a stride, no padding, no groups: it reads every s-th pixel."""
    return (g.kernel_size == (1, 1) and g.stride != (1, 1) and g.padding == (0, 0) and g.dilation == (1, 1)
            and g.groups == 1)


def _strided_pointwise_input_grad(gh: Tensor, x: Tensor, a: Tensor, c: ConvGeometry) -> Tensor:
    """``convᵀ(gh, a)`` of a strided 1x1 conv: aᵀ gh at every s-th pixel, zeros elsewhere.  -> x's shape.

    torch's CPU kernel for it with a few (r) input channels is 10-30x slower than this matrix product
    (ResNet's downsampling convs: 16 ms against 0.5 ms).
    """
    sh, sw = c.stride
    n, r = gh.shape[:2]
    gx = torch.zeros(x.shape, dtype=gh.dtype, device=gh.device)  # (N, in, H, W)
    gx[:, :, ::sh, ::sw] = torch.matmul(a.view(r, -1).t(), gh.reshape(n, r, -1)).view(n, -1, *gh.shape[2:])
    return gx


def _a_backward(gh: Tensor, x: Tensor, a: Tensor, c: ConvGeometry, need_x: bool, need_a: bool):
    """``(convᵀ(gh, a), ∂A)``, each None unless asked for: A's part of ∂x, and A's gradient (r, fan_in)."""
    if need_x and _is_strided_pointwise(c):
        ga = _a_backward(gh, x, a, c, False, True)[1] if need_a else None
        return _strided_pointwise_input_grad(gh, x, a, c), ga
    gx, ga, _ = torch.ops.aten.convolution_backward(
        gh, x, a, None, c.stride, c.padding, c.dilation, False, [0, 0], c.groups, [need_x, need_a, False])
    return gx, (ga.reshape(c.groups, a.shape[0] // c.groups, -1).sum(0) if need_a else None)  # Σ over groups


def _base_backward(g: Tensor, x: Tensor, w: Tensor, c: ConvGeometry, has_bias: bool, need_x, need_w, need_b):
    """``(∂x, ∂w, ∂b)`` of ``conv(x, w) + b``, each None unless asked for."""
    if not (need_x or need_w or (need_b and has_bias)):
        return None, None, None
    return torch.ops.aten.convolution_backward(
        g, x, w, [w.shape[0]] if has_bias else None, c.stride, c.padding, c.dilation, False, [0, 0], c.groups,
        [need_x, need_w, need_b and has_bias])


def _low_rank_from_gw(gw: Tensor, A: Tensor, B: Tensor, scale: float, need_a, need_bb):
    """∂A = scale · Bᵀ ∂W, ∂B = scale · ∂W Aᵀ, when the full weight gradient is computed anyway."""
    gm = gw.reshape(gw.shape[0], -1).to(A.dtype)  # (out, fan_in)
    ga = (B.t() @ gm).mul_(scale) if need_a else None
    gB = (gm @ A.t()).mul_(scale) if need_bb else None
    return ga, gB


def _merged_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``W + scale·ΔW`` in W's dtype; one addmm (one W-sized allocation) when W is fp32 or fp64."""
    if weight.dtype == A.dtype == B.dtype and weight.dtype in (torch.float32, torch.float64):
        return torch.addmm(weight.reshape(weight.shape[0], -1), B, A, alpha=scale).view(weight.shape)
    return functional.effective_weight(weight, A, B, scale)  # summed in fp32, rounded once


def _keep(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, c: ConvGeometry) -> None:
    ctx.conv, ctx.scale, ctx.has_bias, ctx.dtypes = c, scale, bias is not None, (x.dtype, weight.dtype)


def _finish(ctx, gx, gw, gb, ga, gB, A, B):
    x_dtype, w_dtype = ctx.dtypes
    cast = lambda t, dt: None if t is None else t.to(dt)
    return cast(gx, x_dtype), cast(gw, w_dtype), gb, cast(ga, A.dtype), cast(gB, B.dtype), None, None


def _dropped_h(x: Tensor, a: Tensor, c: ConvGeometry, p: float, seed: int) -> Tensor:
    """``conv(dropout(x), a)`` a chunk of samples at a time.  -> (N, G·r, H', W')."""
    hs = [_conv_a(dropout.dropout(x[s], p, seed, offset=o), a, c) for s, o in dropout.slices(x)]
    return hs[0] if len(hs) == 1 else torch.cat(hs)


def _dropped_a_backward(gh: Tensor, x: Tensor, a: Tensor, c: ConvGeometry, p: float, seed: int,
                        gx: Tensor | None, need_a: bool) -> Tensor | None:
    """A's share of backward when its input was ``dropout(x)``: adds ``mask ⊙ convᵀ(gh, a)`` into gx (when
    given) and returns ∂A (r, fan_in) when asked; one chunk of samples at a time."""
    ga = None
    for s, o in dropout.slices(x):
        xd = dropout.dropout(x[s], p, seed, offset=o) if need_a else x[s]
        gxa, ga_s = _a_backward(gh[s], xd, a, c, gx is not None, need_a)
        if gx is not None:
            gx[s].add_(_drop_like(gxa, p, seed, offset=o))
        if need_a:
            ga = ga_s if ga is None else ga.add_(ga_s)
    return ga


class _Activations(torch.autograd.Function):
    """The activations path; with ``p > 0`` the adapter's input is ``dropout(x)`` by the seeded mask of ``seed``,
    formed again in backward for ∂A, and A's part of ∂x is dropped with the same mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float, c: ConvGeometry, p: float = 0.0, seed: int = 0):
        y = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)  # (N, out, H', W')
        a = _filters(A, c, x.dtype)
        h = _dropped_h(x, a, c, p, seed) if p > 0 else _conv_a(x, a, c)  # (N, G·r, H', W')
        _add_low_rank_(y, h.to(y.dtype), B.to(y.dtype), scale, c.groups)
        _keep(ctx, x, weight, bias, scale, c)
        ctx.p, ctx.seed = p, seed
        # x as the convs ran (in the autocast dtype under autocast, as F.conv2d keeps it); the weight
        # itself, cast again in backward, and A (its filters are rebuilt): nothing W-sized is kept.
        ctx.save_for_backward(x.to(y.dtype), weight, A, B, h)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, A, B, h = ctx.saved_tensors
        c, scale, p = ctx.conv, ctx.scale, ctx.p
        w, a = w.to(x.dtype), _filters(A, c, x.dtype)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        gx, gw, gb = _base_backward(g, x, w, c, ctx.has_bias, need_x, need_w, need_b)
        from_gw = need_w and p == 0  # ∂W's products give ∂A, ∂B unless the adapter saw another input
        ga = gB = None
        if from_gw:
            ga, gB = _low_rank_from_gw(gw, A, B, scale, need_a, need_bb)
        elif need_bb:
            gB = _grad_B(g, h, B.to(g.dtype), c.groups).mul_(scale)
        if need_x or (need_a and not from_gw):
            gh = _to_rank(g, B.to(g.dtype), c.groups).mul_(scale)  # (N, G·r, H', W')
            need_ga = need_a and not from_gw
            if p > 0:
                ga_ = _dropped_a_backward(gh, x, a, c, p, ctx.seed, gx if need_x else None, need_ga)
                ga = ga_ if need_ga else ga
            elif (need_x and c.groups == 1 and _is_pointwise(c) and _flat(gx) is not None
                  and _flat(gh) is not None):  # per sample ∂x (in, H·W) += aᵀ (in, r) @ gh (r, H·W): in place
                _flat(gx).baddbmm_(a.view(a.shape[0], -1).t().expand(x.shape[0], -1, -1), _flat(gh))
                if need_ga:
                    ga = _a_backward(gh, x, a, c, False, True)[1]
            else:
                gxa, ga_ = _a_backward(gh, x, a, c, need_x, need_ga)
                ga = ga_ if need_ga else ga
                if need_x:
                    gx.add_(gxa)
        return (*_finish(ctx, gx, gw, gb, ga, gB, A, B), None, None)


def _drop_like(t: Tensor, p: float, seed: int, offset: int = 0) -> Tensor:
    """``t`` dropped by the seeded mask (in place when contiguous)."""
    if t.is_contiguous():
        return dropout.dropout_(t, p, seed, offset=offset)
    return dropout.dropout(t, p, seed, offset=offset)


class _Merged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale: float, c: ConvGeometry):
        w = _merged_weight(weight, A, B, scale)
        y = F.conv2d(x, w, bias, c.stride, c.padding, c.dilation, c.groups)
        _keep(ctx, x, weight, bias, scale, c)
        # The merged weight is formed again in backward (an r-wide product, ~1/pixels of the conv's
        # work), not kept: kept, it would be one more W-sized tensor per layer for the whole step.
        ctx.save_for_backward(x.to(y.dtype), weight, A, B)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B = ctx.saved_tensors
        c, scale = ctx.conv, ctx.scale
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        w = _merged_weight(weight, A, B, scale).to(x.dtype) if need_x or need_w else None
        gx, gw, gb = _base_backward(g, x, w, c, ctx.has_bias, need_x, need_w, need_b)  # ∂W_eff = ∂W
        ga = gB = None
        if need_w:
            ga, gB = _low_rank_from_gw(gw, A, B, scale, need_a, need_bb)
        elif need_a or need_bb:
            a = _filters(A, c, g.dtype)
            if need_bb:
                gB = _grad_B(g, _conv_a(x, a, c), B.to(g.dtype), c.groups).mul_(scale)  # h recomputed
            if need_a:
                gh = _to_rank(g, B.to(g.dtype), c.groups).mul_(scale)
                ga = _a_backward(gh, x, a, c, False, True)[1]
        return _finish(ctx, gx, gw, gb, ga, gB, A, B)


def _is_depthwise(c: ConvGeometry) -> bool:
    """One filter per channel, stride 1, no dilation: the weight gradient ``kernels.depthwise`` computes."""
    return (c.groups == c.in_channels == c.out_channels and c.stride == (1, 1) and c.dilation == (1, 1)
            and not isinstance(c.padding, str))


def _input_grad(g: Tensor, x: Tensor, w: Tensor, c: ConvGeometry) -> Tensor:
    """∂x of ``conv(x, w)`` at g. A depthwise conv's is the forward conv of g with the flipped filters (stride
    1: ``convᵀ(g, w) = conv(g, flip(w))`` with padding ``k - 1 - p``): torch's CPU backward kernel for it runs
    at about 1/5 of its forward's speed on NCHW tensors (ConvNeXt-T's 7x7 convs: 7.8 ms against 1.4 ms)."""
    (kh, kw), (ph, pw) = c.kernel_size, c.padding
    if _is_depthwise(c) and ph < kh and pw < kw:
        return F.conv2d(g, w.flip((-2, -1)), None, 1, (kh - 1 - ph, kw - 1 - pw), 1, c.groups)
    return _base_backward(g, x, w, c, False, True, False, False)[0]


def _weight_grad(g: Tensor, x: Tensor, w: Tensor, c: ConvGeometry) -> Tensor:
    """The full weight gradient of ``conv(x, w)`` at g (W-sized: the dense path's, for tiny fan_in)."""
    if _is_depthwise(c):  # torch's CPU kernel for this one is 15-40x slower than the conv
        gw = depthwise.weight_grad(g, x, c.kernel_size, c.padding)
        if gw is not None:
            return gw
    return _base_backward(g, x, w, c, False, False, True, False)[1]


class _Dense(torch.autograd.Function):
    """The merged weight's conv, with the adapter's gradients taken from the full weight gradient.

    Cheapest where the weight is tiny next to the feature map (depthwise convs): the gradient is
    ``fan_in`` multiply-adds per output element, against r-wide passes for the other paths.
    """

    forward = staticmethod(_Merged.forward)

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B = ctx.saved_tensors
        c, scale = ctx.conv, ctx.scale
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        w = _merged_weight(weight, A, B, scale).to(x.dtype)
        gx = _input_grad(g, x, w, c) if need_x else None
        gb = g.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        gw = _weight_grad(g, x, w, c) if need_w or need_a or need_bb else None  # ∂W_eff = ∂W
        ga, gB = _low_rank_from_gw(gw, A, B, scale, need_a, need_bb) if gw is not None else (None, None)
        return _finish(ctx, gx, gw if need_w else None, gb, ga, gB, A, B)


class _DroppedConv(torch.autograd.Function):
    """``conv(dropout(x), w)`` with a seeded mask (``kernels.dropout``): keeps x and the seed, not the dropped copy.

    ``w`` is A's filters (the activations path), ``scale·ΔW`` (the dense path), or with ``p = 0`` the frozen
    base weight of a dense-path conv. Backward forms
    ``dropout(x)`` again from the seed for w's gradient, and drops ∂x's elements with the same mask.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, p: float, seed: int, c: ConvGeometry) -> Tensor:
        y = F.conv2d(dropout.dropout(x, p, seed), w.to(x.dtype), None, c.stride, c.padding, c.dilation, c.groups)
        ctx.save_for_backward(x, w)
        ctx.p, ctx.seed, ctx.conv, ctx.dtype = p, seed, c, y.dtype
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        c, dt = ctx.conv, ctx.dtype
        need_x, need_w = ctx.needs_input_grad[:2]
        g, wc = g.to(dt), w.to(dt)
        gx = gw = None
        if need_w:
            gw = _weight_grad(g, dropout.dropout(x, ctx.p, ctx.seed).to(dt), wc, c).to(w.dtype)
        if need_x:
            gx = _drop_like(_input_grad(g, x.to(dt), wc, c), ctx.p, ctx.seed)
            gx = gx.to(x.dtype)
        return gx, gw, None, None, None


def dropped_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, terms, geom: ConvGeometry,
                   path: str) -> Tensor | None:
    """``conv(x, W) + b + Σ scale·conv(dropout(x), ΔW)`` with one seeded mask per term, or None when the
    conv pads its input itself (a non-zero ``padding_mode``, an asymmetric ``'same'``: dropout must come
    before that padding, so the caller takes ``functional.lora_conv2d``).

    ``path="dense"`` runs the adapter as one conv with ``scale·ΔW`` (depthwise convs); any other as A's
    filters and B as a 1x1 conv (``activations``: with dropout the merged weight cannot serve both).
    It keeps x (as the base conv does), the seeds, and for ``activations`` each r-wide h.
    """
    left, right, top, bottom = geom.explicit_padding()
    if geom.padding_mode != "zeros" or left != right or top != bottom:
        return None  # pad_input would pad x itself
    seeds = [dropout.new_seed() for _ in terms]  # drawn only here: a fallback draws from the generator as before
    c = functional.pad_input(x, geom)[1]
    if path != "dense" and len(terms) == 1:  # one adapter: the activations path's own function, with the mask
        t = terms[0]
        return _Activations.apply(x, weight, bias, t.A, t.B, t.scale, c, t.dropout, seeds[0])
    if path == "dense":  # the base conv through the same function (p = 0): its ∂x takes ``_input_grad``
        y = _DroppedConv.apply(x, weight, 0.0, 0, c)
        y = y if bias is None else y + bias.view(1, -1, 1, 1)
    else:
        y = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
    for t, seed in zip(terms, seeds, strict=True):
        if path == "dense":
            delta = (t.B * t.scale) @ t.A  # (out, fan_in): W-sized, tiny where this path is taken
            y = y + _DroppedConv.apply(x, delta.reshape(weight.shape), t.dropout, seed, c)
        else:
            h = _DroppedConv.apply(x, _filters(t.A, c, t.A.dtype), t.dropout, seed, c)  # (N, G·r, H', W')
            b = (t.B * t.scale).reshape(t.B.shape[0], -1, 1, 1)
            y = y + F.conv2d(h, b.to(h.dtype), None, 1, 0, 1, c.groups)
    return y


def adapted_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                geom: ConvGeometry, path: str = "activations") -> Tensor:
    """``functional.lora_conv2d`` without dropout, as one autograd function.  x: (N, in, H, W).

    Args:
        geom: the conv's geometry, as ``ConvGeometry.of(conv)`` gives it (any padding, any padding_mode).
        path: ``"activations"``, ``"merged"`` or ``"dense"`` (see the module docstring); the result is the same.
    """
    x, c = functional.pad_input(x, geom)
    fn = {"activations": _Activations, "merged": _Merged, "dense": _Dense}[path]
    return fn.apply(x, weight, bias, A, B, scale, c)
