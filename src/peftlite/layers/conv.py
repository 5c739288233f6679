"""The adapted ``nn.Conv2d``, and the cost model that picks how each call computes it.

Every path computes the same thing, exactly: the base conv with weight ``W + scale·ΔW``, for any stride,
padding, dilation, padding_mode and groups. The paths (names used throughout peftlite):

- ``activations``: the base conv, plus the adapter through activations (``conv(x, A)``, then B as a
  grouped 1x1 conv), added in place (``conv_autograd``);
- ``merged``: one conv with the merged weight ``W + scale·ΔW``, with r-wide adapter gradients
  (``conv_autograd``);
- ``dense`` (training only): the merged weight's conv, with the adapter's gradients from the full
  weight gradient (``conv_autograd``); cheapest when ``fan_in`` is tiny (depthwise convs).

With dropout active in training the layer runs ``conv_autograd.dropped_conv2d`` (a seeded mask that
backward regenerates; ``dense`` where the cost model says so, else ``activations``), or, for a conv
that pads its input itself, ``functional.lora_conv2d`` under plain autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional
from ..functional import ConvGeometry
from . import conv_autograd, dora, routing
from .base import AdaptedLayer, effective_weight_property

# Forming W + scale·ΔW touches W about three times (read, temporary write, read by the conv); counted as
# this many multiply-adds per weight element, since those passes are memory-bound.
WEIGHT_PASS_COST = 8

# On CPU the r-wide products of the adapter (skinny matrix products) run at about half the rate of the
# base conv's; counted as this many multiply-adds per multiply-add.
RANK_PASS_COST = 2


def inference_path(geom: ConvGeometry, rank: int, pixels: int) -> str:
    """``"activations"`` or ``"merged"``: the cheaper way to run a conv whose adapter needs no gradient.

    Activations: the A and B convs, ``r·(groups·fan_in + out)`` multiply-adds per output pixel.
    Merged: ΔW (``r·out·fan_in``) plus the memory-bound passes over W. Large feature maps (early layers,
    depthwise convs) take the merged weight; small ones (late layers, small batches of large channels)
    the activations.
    """
    activations = pixels * rank * (geom.groups * geom.fan_in + geom.out_channels)
    merged = geom.out_channels * geom.fan_in * (rank + WEIGHT_PASS_COST)
    return "activations" if activations < merged else "merged"


def training_path(geom: ConvGeometry, rank: int, pixels: int | None = None) -> str:
    """``"activations"``, ``"merged"`` or ``"dense"``: the cheapest way to train a conv's adapter.

    Counts multiply-adds over ``pixels`` outputs. With ``R = RANK_PASS_COST · r·(groups·fan_in + out)``,
    the cost of one r-wide pass over the pixels:

    - ``activations``: three such passes (h and B h forward; ∂h, ∂B, ∂A and A's part of ∂x backward, in
      pairs), ``3·R`` per pixel;
    - ``merged``: the base conv runs with ``W + scale·ΔW`` both ways, and only the adapter's gradients
      take r-wide passes (h recomputed, ∂h, ∂B, ∂A): ``2·R`` per pixel, plus forming the merged weight
      once, ``out·fan_in·(r + WEIGHT_PASS_COST)``;
    - ``dense``: the full weight-gradient conv, ``out·fan_in`` per pixel, plus forming ΔW and its
      gradients, ``out·fan_in·(3·r + WEIGHT_PASS_COST)``.

    Large feature maps take ``merged``, small ones (late layers, small batches) ``activations``, and
    convs with a tiny ``fan_in`` (depthwise) ``dense``. ``pixels=None`` is the many-pixel limit.
    """
    per_pixel = RANK_PASS_COST * rank * (geom.groups * geom.fan_in + geom.out_channels)
    weight_elems = geom.out_channels * geom.fan_in
    if pixels is None:
        return "merged" if 2 * per_pixel < weight_elems else "dense"
    costs = {
        "activations": 3 * per_pixel * pixels,
        "merged": 2 * per_pixel * pixels + weight_elems * (rank + WEIGHT_PASS_COST),
        "dense": weight_elems * (pixels + 3 * rank + WEIGHT_PASS_COST),
    }
    return min(costs, key=costs.get)


class LoraConv2d(AdaptedLayer, nn.Conv2d):
    """``nn.Conv2d`` with low-rank adapters: the conv with ``W + scale·ΔW``, ``ΔW = (B @ A).reshape(W.shape)``."""

    adapter_kind = "conv2d"
    base_class = nn.Conv2d
    weight = effective_weight_property("weight")
    geometry: ConvGeometry  # set by registry.attach

    def forward(self, x: Tensor) -> Tensor:
        w = self._parameters["weight"]
        route = routing.lookup(self)
        if route is not None and self.adapter_state.enabled:
            y = routing.conv2d(x, w, self.bias, route, self.geometry, *routing.operands(w, self.weight_pairs(), route),
                               self.training)
            rest = self.residual_term("weight", 1.0)
            if rest is None:
                return y
            owner = list(self.lora).index(self.adapter_state.residual.owner)
            delta = functional.conv2d_dropout_delta(x, rest.A, rest.B, rest.scale, self.geometry)
            return routing.with_residual(y, route.slots, owner, delta)
        if not self.adapter_state.computes_adapter:
            return self._conv_forward(x, w, self.bias)
        terms = self.terms("weight")
        if any(t.kron is not None for t in terms):  # LoKr: each term by its own form (no pair to fold)
            y = self._conv_forward(x, w, self.bias)
            for t in terms:
                if t.kron is not None:
                    d = functional.kron_conv2d_delta(x, *t.kron, t.scale, self.geometry, t.dropout, self.training)
                else:
                    d = functional.conv2d_dropout_delta(x, t.A, t.B, t.scale, self.geometry, t.dropout, self.training)
                y = y.add_(d)  # the base conv's output: its backward does not read it
            return y
        dora_pair = terms[0].dora if len(terms) == 1 else None
        y = self._adapted(x, w, None if dora_pair is not None else self.bias, terms)
        if dora_pair is None:
            return y
        t = terms[0]
        y = y * dora.gain(w, t.A, t.B, t.scale, dora_pair).to(y.dtype).view(-1, 1, 1)
        return y if self.bias is None else y + self.bias.view(-1, 1, 1)

    def _adapted(self, x: Tensor, w: Tensor, bias: Tensor | None, terms) -> Tensor:
        """The conv with ``W + Σ scale·ΔW`` by the cheapest exact path (module docstring)."""
        geom = self.geometry
        A, B, scale = functional.fold([t.A for t in terms], [t.B for t in terms], [t.scale for t in terms])
        rank, pixels = A.shape[0], geom.output_pixels(x.shape)
        if self.training and any(t.dropout > 0.0 for t in terms):
            y = None
            if not torch.compiler.is_compiling():  # a traced graph takes torch's dropout, as the reference does
                path = "dense" if training_path(geom, rank, pixels) == "dense" else "activations"
                y = conv_autograd.dropped_conv2d(x, w, bias, terms, geom, path)
            if y is None:
                y = self._conv_forward(x, w, bias)
                for t in terms:
                    y = y + functional.conv2d_dropout_delta(x, t.A, t.B, t.scale, geom, t.dropout, True)
            return y
        if torch.is_grad_enabled() and any(t.A.requires_grad or t.B.requires_grad for t in terms):
            path = training_path(geom, rank, pixels)
        else:
            path = inference_path(geom, rank, pixels)
        return conv_autograd.adapted_conv2d(x, w, bias, A, B, scale, geom, path)
