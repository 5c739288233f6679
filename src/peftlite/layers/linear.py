"""The adapted ``nn.Linear``, and its unmerged forward as one autograd function.

    y = x @ Wᵀ + b;   h = x @ Aᵀ  (..., r);   y += scale · h @ Bᵀ   (addmm_ into y: no output-sized temp)

Backward, with g = ∂L/∂y and u = g @ B  (..., r):

    ∂x = g @ W + scale · u @ A      ∂A = scale · uᵀ @ x      ∂B = scale · gᵀ @ h
    ∂W = gᵀ @ x  (only if W trains)  ∂b = Σ g  (only if b trains)

It saves x and references to the parameters: nothing output-sized, and not h either (backward forms
it again, an r-wide product: ``r/out`` of the layer's forward work), so an adapted Linear keeps exactly
what a trainable one keeps. Under autocast the products run in the autocast dtype (as ``F.linear``
would), and ∂B accumulates in fp32 (or wider). ``functional.lora_linear`` is the reference it must match.

With dropout active in training the layer runs ``dropped_linear``: the adapter's input is dropped by a
seeded mask (``kernels.dropout``), drawn anew per call, that backward regenerates from the seed, so no
dropped copy of x is kept (``F.dropout`` kept one per layer and doubled a step's memory), nor formed as
an x-sized temporary (a block of rows at a time). Under ``torch.compile`` it takes ``functional.lora_linear``
with ``F.dropout`` instead.

Without grad (inference) ``adapted_linear`` runs the same products directly, skipping the autograd
function's bookkeeping (a few µs a call: ``benchmarks/t5_reads.py --breakdown``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from ..kernels import dropout
from . import dora, routing
from .base import AdaptedLayer, effective_weight_property


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float):
    """``(y, h)``: the layer's output and the rank-sized ``h = x @ Aᵀ`` that backward needs.

    Both products run on ``x`` as one (N, in) matrix: for a non-contiguous 3-D ``x`` (attention's
    transposed inputs) ``F.linear`` on a frozen weight would take ``bmm`` with the weight expanded per
    batch, several times slower than one ``mm`` both ways (``benchmarks/lean.py --frozen-kinds``).
    """
    x2 = x.reshape(-1, x.shape[-1])  # (N, in): a view when x is contiguous, else one copy (not kept)
    y = F.linear(x2, weight, bias)  # (N, out), in the autocast dtype when autocast is on
    h = F.linear(x2, A.to(x.dtype))  # (N, r)
    y.addmm_(h.to(y.dtype), B.to(y.dtype).t(), alpha=scale)
    # A view of y returned from the autograd function would forbid in-place changes of the output
    # (ReLU(inplace=True) after a Linear, as in torchvision's swin_v2). _unsafe_view, as aten::matmul
    # uses, gives the same storage as a non-view: no copy.
    shape = (*x.shape[:-1], y.shape[-1])
    return torch.ops.aten._unsafe_view(y, shape), h


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float):
        y, h = _forward(x, weight, bias, A, B, scale)
        ctx.save_for_backward(x, weight, A, B)  # h is formed again in backward: nothing but x is kept
        ctx.scale, ctx.has_bias, ctx.dtype = scale, bias is not None, h.dtype  # h's dtype: autocast's, if on
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, A, B = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if need_bb:  # h = x Aᵀ again, as the forward computed it (same dtype, same product): r/out of its work
            h = F.linear(x2.to(ctx.dtype), A.to(ctx.dtype))
            h = h.to(torch.promote_types(h.dtype, torch.float32))  # ∂B accumulates in fp32 at least
        u = g2 @ B.to(g2.dtype)  # (N, r)
        gx = gw = gb = ga = gB = None
        if need_x:
            gx = g2 @ weight.to(g2.dtype)
            gx.addmm_(u, A.to(g2.dtype), alpha=scale)
            gx = gx.view(x.shape).to(x.dtype)
        if need_w:
            gw = (g2.t() @ x2.to(g2.dtype)).to(weight.dtype)
        if need_b and ctx.has_bias:
            gb = g2.sum(0)
        if need_a:
            ga = (u.t() @ x2.to(u.dtype)).mul_(scale).to(A.dtype)
        if need_bb:
            gB = (g2.t().to(h.dtype) @ h).mul_(scale).to(B.dtype)
        return gx, gw, gb, ga, gB, None


class _FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` for a frozen W and b (x: (N, in)): keeps W itself, not the cast copy autocast makes (a
    bf16 W-sized tensor per layer per step, which ``F.linear`` keeps for ∂x under autocast)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(weight)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        (weight,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # one product: a strided N-D g (ConvNeXt's blocks) takes a broadcast bmm
        return (g2 @ weight.to(g.dtype)).view(*g.shape[:-1], weight.shape[1]).to(ctx.dtype), None, None


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, keeping no cast copy of a frozen weight under autocast (``_FrozenLinear``)."""
    if not torch.is_grad_enabled() or weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    return _FrozenLinear.apply(x, weight, bias)


class LeanLinear(nn.Linear):
    """A plain ``nn.Linear`` that ``wrap`` froze and did not adapt: the stock module, whose forward under autocast
    keeps its frozen weight for ∂x rather than the cast copy ``F.linear`` keeps (``frozen_linear``: a bf16 W per
    layer per step; the weight is cast again in backward), and takes a strided N-D input as one 2-D product.
    Otherwise ``nn.Linear``'s own forward."""

    plain_class = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2 and not x.is_contiguous() and torch.is_grad_enabled() and not self.weight.requires_grad:
            # torch runs a frozen W on a strided N-D x as a broadcast bmm (a step 1.6x a trainable Linear's): one
            # 2-D product on x's copy instead
            return self._linear(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        return self._linear(x)

    def _linear(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return frozen_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class _DroppedLinear(torch.autograd.Function):
    """``dropout(x) @ Aᵀ`` with a seeded mask (``kernels.dropout``): keeps x and the seed, never the dropped copy.

    Backward forms ``dropout(x)`` again from the seed for ∂A, and drops ∂x's elements with the same mask.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, p: float, seed: int) -> Tensor:
        h = F.linear(dropout.dropout(x, p, seed), A.to(x.dtype))  # (N, r), in the autocast dtype if on
        ctx.save_for_backward(x, A)
        ctx.p, ctx.seed, ctx.dtype = p, seed, h.dtype
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        x, A = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[:2]
        gh = gh.to(ctx.dtype)
        gx = ga = None
        if need_a:
            ga = (gh.t() @ dropout.dropout(x, ctx.p, ctx.seed).to(ctx.dtype)).to(A.dtype)
        if need_x:
            gx = dropout.dropout_(gh @ A.to(ctx.dtype), ctx.p, ctx.seed).to(x.dtype)
        return gx, ga, None, None


class _DroppedLowRankLinear(torch.autograd.Function):
    """``x Wᵀ + b + scale·(dropout(x) Aᵀ) Bᵀ`` for one adapter, with a seeded mask.  x: (N, in), contiguous.

    Forward adds the adapter into y in place; backward forms A's share of ∂x, drops it and adds ``g W`` into
    it in place (``addmm_``), so the only x-sized tensor it makes is ∂x itself. ``dropout(x)`` is formed
    again, a block of rows at a time (``offset=``: the mask of the whole), for ∂A. Keeps x, h (N, r) and
    references to the parameters.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                p: float, seed: int) -> Tensor:
        y = F.linear(x, weight, bias)  # (N, out), in the autocast dtype when autocast is on
        a = A.to(x.dtype)
        h = torch.cat([F.linear(dropout.dropout(x[s], p, seed, offset=o), a) for s, o in dropout.slices(x)])  # (N, r)
        y.addmm_(h.to(y.dtype), B.to(y.dtype).t(), alpha=scale)
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.scale, ctx.p, ctx.seed, ctx.has_bias, ctx.dtype = scale, p, seed, bias is not None, h.dtype
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, A, B, h = ctx.saved_tensors
        scale, p, seed, dt = ctx.scale, ctx.p, ctx.seed, ctx.dtype
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        gx = gw = gb = ga = gB = None
        g = g.to(dt)
        u = (g @ B.to(dt)).mul_(scale)  # (N, r): scale·∂h
        if need_x:
            gx = u @ A.to(dt)  # (N, in): A's share, dropped in place, then the base's added by the product
            dropout.dropout_(gx, p, seed)
            gx = gx.addmm_(g, weight.to(dt)).to(x.dtype)
        if need_a:
            acc = torch.promote_types(dt, torch.float32)
            ga = torch.zeros(A.shape, dtype=acc, device=A.device)
            for s, o in dropout.slices(x):
                xd = dropout.dropout(x[s], p, seed, offset=o).to(dt)
                ga.addmm_(u[s].t().to(acc), xd.to(acc))
            ga = ga.to(A.dtype)
        if need_bb:
            hb = h.to(torch.promote_types(h.dtype, torch.float32))  # ∂B accumulates in fp32 at least
            gB = (g.t().to(hb.dtype) @ hb).mul_(scale).to(B.dtype)
        if need_w:
            gw = (g.t() @ x.to(dt)).to(weight.dtype)
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        return gx, gw, gb, ga, gB, None, None, None


def dropped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, terms) -> Tensor:
    """``x Wᵀ + b + Σ scale·(dropout(x) Aᵀ) Bᵀ`` with one seeded mask per term (seeds drawn here, in order).

    The lean form of ``functional.lora_linear`` with dropout: x (and each h, r-sized) is all it keeps. One
    adapter with dropout takes ``_DroppedLowRankLinear``; several, one autograd node per term.
    x: (..., in) -> (..., out).
    """
    seeds = [dropout.new_seed() for _ in terms]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in): one matrix product each way (see ``_forward``)
    if len(terms) == 1 and terms[0].dropout > 0.0:
        t = terms[0]
        y = _DroppedLowRankLinear.apply(x2.contiguous(), weight, bias, t.A, t.B, t.scale, t.dropout, seeds[0])
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))  # see ``_forward``
    y = frozen_linear(x2, weight, bias)  # a frozen W: no autocast copy of it kept
    for t, seed in zip(terms, seeds, strict=True):
        h = _DroppedLinear.apply(x2, t.A, t.dropout, seed) if t.dropout > 0.0 else F.linear(x2, t.A.to(x.dtype))
        y = torch.addmm(y, h, (t.B * t.scale).to(h.dtype).t())  # y + scale·h Bᵀ
    return y.view(*x.shape[:-1], y.shape[-1])


def adapted_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``x @ Wᵀ + b + scale·(x @ Aᵀ) @ Bᵀ`` without dropout.  x: (..., in) -> (..., out)."""
    if not torch.is_grad_enabled():  # inference: the same products, without the autograd function
        return _forward(x, weight, bias, A, B, scale)[0]
    return _LowRankLinear.apply(x, weight, bias, A, B, scale)


class LoraLinear(AdaptedLayer, nn.Linear):
    """``nn.Linear`` with low-rank adapters: ``x @ (W + Σ scale·B A)ᵀ + b``, W frozen, the adapters trained."""

    adapter_kind = "linear"
    base_class = nn.Linear
    weight = effective_weight_property("weight")

    def forward(self, x: Tensor) -> Tensor:
        w = self._parameters["weight"]
        route = routing.lookup(self)
        if route is not None and self.adapter_state.enabled:
            y = routing.linear(x, w, self.bias, route, *routing.operands(w, self.weight_pairs(), route), self.training)
            rest = self.residual_term("weight", 1.0)
            if rest is None:
                return y
            owner = list(self.lora).index(self.adapter_state.residual.owner)
            return routing.with_residual(y, route.slots, owner, functional.linear_delta(x, rest.A, rest.B, rest.scale))
        if not self.adapter_state.computes_adapter:
            return nn.functional.linear(x, w, self.bias)
        terms = self.terms("weight")
        if any(t.kron is not None for t in terms):  # LoKr: each term by its own form (no pair to fold)
            y = nn.functional.linear(x, w, self.bias)
            for t in terms:
                delta = functional.kron_linear_delta if t.kron is not None else functional.linear_delta
                y = y.add_(delta(x, *(t.kron or (t.A, t.B)), t.scale, t.dropout, self.training))  # y: not saved
            return y
        dora_pair = terms[0].dora if len(terms) == 1 else None
        bias = None if dora_pair is not None else self.bias  # DoRA scales the rows first, then adds the bias
        if self.training and any(t.dropout > 0.0 for t in terms):
            if torch.compiler.is_compiling():  # a traced graph takes torch's dropout, as the reference does
                y = nn.functional.linear(x, w, bias)
                for t in terms:
                    y = y + functional.linear_delta(x, t.A, t.B, t.scale, t.dropout, True)
            else:
                y = dropped_linear(x, w, bias, terms)
        else:
            A, B, scale = functional.fold([t.A for t in terms], [t.B for t in terms], [t.scale for t in terms])
            y = adapted_linear(x, w, bias, A, B, scale)
        if dora_pair is None:
            return y
        t = terms[0]
        y = y * dora.gain(w, t.A, t.B, t.scale, dora_pair).to(y.dtype)
        return y if self.bias is None else y + self.bias
