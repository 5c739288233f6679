"""The adapted ``nn.MultiheadAttention``: adapters on its q/k/v projection, read through the weight property.

``nn.MultiheadAttention`` never calls its projections as modules: its forward (both the eval fast path
and ``F.multi_head_attention_forward``) reads ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when the key/value sizes differ) and ``out_proj.weight``. So the adapted class keeps
the stock forward and turns those attributes into effective-weight properties; its ``out_proj`` is
adapted as a ``LoraLinear`` of its own (``wrap`` adds it with the attention layer).
"""

from __future__ import annotations

from torch import nn

from .base import AdaptedLayer, effective_weight_property

PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def projection_slots(module: nn.MultiheadAttention) -> tuple[str, ...]:
    """The weights that get adapters: the packed projection, or the three separate ones."""
    return ("in_proj_weight",) if module._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")


class LoraMultiheadAttention(AdaptedLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose q/k/v projection weights carry low-rank adapters (one pair each)."""

    adapter_kind = "mha"
    base_class = nn.MultiheadAttention
    in_proj_weight = effective_weight_property("in_proj_weight")
    q_proj_weight = effective_weight_property("q_proj_weight")
    k_proj_weight = effective_weight_property("k_proj_weight")
    v_proj_weight = effective_weight_property("v_proj_weight")
