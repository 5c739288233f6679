"""Adapted layers: the adapter protocol (``AdaptedLayer``) and one literal class per supported layer type.

    spec.py         AdapterSpec: an adapter's hyper-parameters, their validation, the scale, file entry fields
    base.py         LowRank, LayerState, AdaptedLayer (the protocol), the effective-weight property
    loha.py         LowHadamard: a LoHa adapter, read as its exact low-rank pair
    lokr.py         LowKronecker: a LoKr adapter (W1 ⊗ W2), its split, its exact pair
    linear.py       LoraLinear and its autograd function
    conv.py         LoraConv2d and the cost model that picks its path; conv_autograd.py its functions
    attention.py    LoraMultiheadAttention, LeanMultiheadAttention (a lean training forward for both)
    batchnorm.py    frozen BatchNorm statistics (the ``train_bn=False`` policy)
    registry.py     the table of adaptable types, classes for user subclasses, attach / detach
"""

from .attention import LeanMultiheadAttention, LoraMultiheadAttention
from .base import DEFAULT_ADAPTER, AdaptedLayer, AdapterStateError, LayerState, LowRank, adapted_layers
from .conv import LoraConv2d
from .linear import LoraLinear

__all__ = [
    "DEFAULT_ADAPTER",
    "AdaptedLayer",
    "AdapterStateError",
    "LayerState",
    "LeanMultiheadAttention",
    "LoraConv2d",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LowRank",
    "adapted_layers",
]
