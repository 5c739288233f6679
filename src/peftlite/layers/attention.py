"""``nn.MultiheadAttention`` in a wrapped model: adapters on its q/k/v projection, and a lean training forward.

``nn.MultiheadAttention`` never calls its projections as modules: its forward (both the eval fast path
and ``F.multi_head_attention_forward``) reads ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when the key/value sizes differ) and ``out_proj.weight``. So the adapted class turns
those attributes into effective-weight properties, and its ``out_proj`` is adapted as a ``LoraLinear``
of its own (``wrap`` adds it with the attention layer): whatever reads them sees ``W + scale·ΔW``.

Read that way, training pays twice: the projection's gradient is formed W-sized (``∂W_eff = gᵀ x``)
before it reaches A and B, and torch runs a batch-first input's projection as a ``bmm`` over the weight
expanded per batch, because the transposed input cannot be folded into one matrix when the weight is
frozen: several times slower in backward than the same layer trainable. So with gradients enabled both
classes here run ``LeanAttention.forward``: the same math as ``F.multi_head_attention_forward``, each
projection one (N, E) matrix product (through ``linear.adapted_linear`` for an adapted one: r-wide
gradients), the attention by ``F.scaled_dot_product_attention`` (or, with ``need_weights``, the explicit
softmax torch uses), and ``out_proj`` called as a module. Without gradients, with ``bias_k``/``bias_v``
or ``add_zero_attn``, a DoRA projection, or inside ``per_sample``, they take the stock forward.

``wrap`` gives every plain ``nn.MultiheadAttention`` it does not adapt the class ``LeanMultiheadAttention``
(back at ``unwrap``), as it gives frozen BatchNorms theirs: the layers it froze are its to run fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from .base import AdaptedLayer, effective_weight_property
from .linear import adapted_linear, frozen_linear
from .routing import lookup

PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def projection_slots(module: nn.MultiheadAttention) -> tuple[str, ...]:
    """The weights that get adapters: the packed projection, or the three separate ones."""
    return ("in_proj_weight",) if module._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")


class LeanAttention:
    """Mixin placed before ``nn.MultiheadAttention``: its forward with gradients, computed as described above."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if not torch.is_grad_enabled() or not self._lean(query, key, value) or (is_causal and attn_mask is None):
            return nn.MultiheadAttention.forward(self, *args)
        return _lean_forward(self, *args)

    def _lean(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Can ``_lean_forward`` compute this call? (Else the stock forward does.)"""
        return (self.bias_k is None and self.bias_v is None and not self.add_zero_attn
                and not any(t.is_nested for t in (query, key, value)) and query.dim() in (2, 3))

    def _project(self, x: Tensor, slot: str, rows: slice, bias: Tensor | None) -> Tensor:
        """``x @ W[rows]ᵀ + bias`` for projection weight ``slot``.  x: (N, E_in) -> (N, rows)."""
        return frozen_linear(x, self._parameters[slot][rows], bias)


def _lean_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                  is_causal):
    """``F.multi_head_attention_forward``'s result, computed batch-first with one product per projection."""
    F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)  # torch's own errors
    self_attention, shared_kv = query is key and key is value, key is value
    unbatched = query.dim() == 2
    if unbatched:  # (L, E) -> (1, L, E)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not self.batch_first:  # (L, N, E) -> (N, L, E), views
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    bsz, tgt_len, embed = query.shape
    src_len, heads = key.shape[1], self.num_heads
    head_dim = embed // heads

    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        is_causal = is_causal and key_padding_mask is None
    q, k, v = _projections(self, query, key, value, self_attention, shared_kv)  # (N, L|S, E) each

    if attn_mask is not None:  # -> (1, L, S) or (N·H, L, S), as torch checks it
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.shape != (bsz * heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(bsz * heads, tgt_len, src_len)}.")
    if key_padding_mask is not None:  # (N, S) -> (N·H, 1, S), added to the mask
        padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
        padding = padding.reshape(bsz * heads, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    if attn_mask is not None:  # (1 | N·H, L | 1, S) -> (1 | N, 1 | H, L | 1, S): broadcasts over (N, H, L, S)
        attn_mask = attn_mask.view(-1, heads if attn_mask.shape[0] > 1 else 1, *attn_mask.shape[1:])
    dropout = self.dropout if self.training else 0.0

    q = q.view(bsz, tgt_len, heads, head_dim).transpose(1, 2)  # (N, H, L, D)
    k = k.view(bsz, src_len, heads, head_dim).transpose(1, 2)  # (N, H, S, D)
    v = v.view(bsz, src_len, heads, head_dim).transpose(1, 2)
    weights = None
    if need_weights:  # torch's explicit path, whose weights are returned (after dropout, as torch's are)
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)  # (N, H, L, S)
        weights = F.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        out = weights @ v  # (N, H, L, D)
        weights = weights.mean(dim=1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal)  # (N, H, L, D)
    out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, embed))  # a module call: its adapters apply
    if unbatched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    return (out if self.batch_first else out.transpose(0, 1)), weights


def _projections(self, query, key, value, self_attention, shared_kv):
    """q, k, v: (N, L, E), (N, S, E), (N, S, E); one matrix product per distinct input."""
    embed = self.embed_dim
    flat = lambda t: t.reshape(-1, t.shape[-1])  # (N·L, E): a view for batch-first inputs, else one copy
    bias = self.in_proj_bias
    b = (None, None, None) if bias is None else bias.chunk(3)
    if not self._qkv_same_embed_dim:
        out = [self._project(flat(x), slot, slice(None), bb) for x, slot, bb in
               zip((query, key, value), ("q_proj_weight", "k_proj_weight", "v_proj_weight"), b, strict=True)]
    elif self_attention:
        qkv = self._project(flat(query), "in_proj_weight", slice(None), bias)  # (N·L, 3E)
        out = list(qkv.chunk(3, dim=-1))
    elif shared_kv:
        kv_bias = None if bias is None else bias[embed:]
        out = [self._project(flat(query), "in_proj_weight", slice(0, embed), b[0]),
               *self._project(flat(key), "in_proj_weight", slice(embed, None), kv_bias).chunk(2, dim=-1)]
    else:
        out = [self._project(flat(x), "in_proj_weight", slice(i * embed, (i + 1) * embed), b[i])
               for i, x in enumerate((query, key, value))]
    return [t.reshape(x.shape[0], x.shape[1], embed) for t, x in zip(out, (query, key, value), strict=True)]


class LeanMultiheadAttention(LeanAttention, nn.MultiheadAttention):
    """A plain ``nn.MultiheadAttention`` that ``wrap`` did not adapt: the stock module, the lean training forward."""

    plain_class = nn.MultiheadAttention


class LoraMultiheadAttention(AdaptedLayer, LeanAttention, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose q/k/v projection weights carry low-rank adapters (one pair each)."""

    adapter_kind = "mha"
    base_class = nn.MultiheadAttention
    in_proj_weight = effective_weight_property("in_proj_weight")
    q_proj_weight = effective_weight_property("q_proj_weight")
    k_proj_weight = effective_weight_property("k_proj_weight")
    v_proj_weight = effective_weight_property("v_proj_weight")

    def _lean(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        state = self.adapter_state
        if lookup(self) is not None or not super()._lean(query, key, value):
            return False
        return not (state.computes_adapter and any(self.dora_term(s) is not None for s in projection_slots(self)))

    def _project(self, x: Tensor, slot: str, rows: slice, bias: Tensor | None) -> Tensor:
        w = self._parameters[slot]
        terms = self.terms(slot) if self.adapter_state.computes_adapter else []  # formed once per call
        if not terms:
            return frozen_linear(x, w[rows], bias)
        if any(t.kron is not None for t in terms):  # LoKr: the dense ΔW
            return F.linear(x, functional.add_delta(w, sum(t.delta() for t in terms))[rows], bias)
        A, B, scale = functional.fold([t.A for t in terms], [t.B for t in terms], [t.scale for t in terms])
        return adapted_linear(x, w[rows], bias, A, B[rows], scale)
