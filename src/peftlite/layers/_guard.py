"""The effective weight ``W + scale·ΔW`` that direct readers of ``module.weight`` receive: lazy and guarded.

Lazy: many readers only look at metadata (T5 reads ``self.wo.weight.dtype`` before every call of ``wo``,
24 times per t5-small forward). ``EffectiveWeight`` is a wrapper tensor (``_make_wrapper_subclass``) that
knows its dtype, shape, strides, device and ``requires_grad`` without computing anything, and builds
``W + scale·ΔW`` once, when its values are first used: any torch function but a metadata query
materialises it, under the grad mode of the read, so autograd reaches A and B as before. Results are
plain tensors.

Guarded: an in-place write (``nn.init.zeros_(layer.weight)``, ``layer.weight.mul_(2)``, ``[0] = …``,
``out=``) would land in a temporary and be lost, so it raises instead.

Snapshot semantics: the value is that of the read. If W, A or B is written in place between the read and
the first use (the reader kept the tensor across an optimizer step or a merge), materialising raises
instead of returning a value the read never had.

``__torch_dispatch__`` is the fallback for callers below ``__torch_function__`` (C++ code): values are
correct there, but autograd has already passed, so it refuses when a gradient would be needed. Under
``torch.compile`` the property returns the plain computed tensor (``effective``): no subclass in a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__idiv__",
    "__set__",  # a property setter: ``w.data = …``
})


def _metadata_queries() -> frozenset:
    """The torch functions that answer from a tensor's metadata alone (the wrapper has it all)."""
    getters = ("dtype", "shape", "device", "ndim", "layout", "requires_grad", "itemsize", "nbytes", "is_cuda",
               "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_nested", "is_mkldnn", "is_xpu", "is_mps")
    methods = ("size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
               "is_contiguous", "stride", "get_device", "is_signed", "__len__")
    found = {getattr(Tensor, n).__get__ for n in getters if hasattr(Tensor, n)}
    found |= {getattr(Tensor, n) for n in methods if hasattr(Tensor, n)}
    found |= {getattr(torch, n) for n in ("numel", "is_floating_point", "is_complex") if hasattr(torch, n)}
    return frozenset(found)


_METADATA = _metadata_queries()
_WRITE_MESSAGE = (
    "in-place write ({}) to the effective weight of an adapted layer: it is a temporary W + scale·ΔW and the "
    "write would be lost. Write inside `with peftlite.disabled(model):` to change the base weight, or unwrap "
    "the model first."
)


def _writes_in_place(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if kwargs and kwargs.get("out") is not None:
        return any(isinstance(t, EffectiveWeight) for t in _flat(kwargs["out"]))
    is_inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))
    return is_inplace and bool(args) and isinstance(args[0], EffectiveWeight)


def _dispatch_writes(func, args, kwargs) -> bool:
    """Does an aten op write into one of our wrappers (an ``a!`` argument)?"""
    schema = func._schema
    if not schema.is_mutable:
        return False
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and any(
                isinstance(t, EffectiveWeight) for t in _flat(value)):
            return True
    return False


def _flat(x):
    return x if isinstance(x, (tuple, list)) else (x,)


def _strides(like: Tensor) -> tuple[int, ...]:
    """The strides an elementwise result over ``like`` gets: like's when dense (contiguous or channels-last),
    else contiguous ones."""
    if like.is_contiguous() or (like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)):
        return like.stride()
    strides, step = [], 1
    for n in reversed(like.shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class EffectiveWeight(Tensor):
    """``W + scale·ΔW`` for a direct reader: metadata now, values when used; refuses in-place writes.

    Made by ``effective``; ``materialize()`` gives the plain tensor (computed once, then kept).
    """

    _compute: Callable[[], Tensor]
    _inputs: tuple[Tensor, ...]
    _versions: tuple[int, ...]
    _grad_enabled: bool
    _value: Tensor | None

    @staticmethod
    def __new__(cls, compute: Callable[[], Tensor], inputs: tuple[Tensor, ...], like: Tensor, requires_grad: bool):
        t = Tensor._make_wrapper_subclass(cls, like.shape, strides=_strides(like), dtype=like.dtype,
                                          device=like.device, requires_grad=requires_grad)
        t._compute, t._inputs = compute, inputs
        t._versions = tuple(x._version for x in inputs)
        t._grad_enabled = torch.is_grad_enabled()
        t._value = None
        return t

    def materialize(self) -> Tensor:
        """The plain ``W + scale·ΔW``, as it was when the weight was read (autograd to A and B included).

        Raises:
            RuntimeError: W or an adapter was written in place since the read.
        """
        if self._value is None:
            if tuple(x._version for x in self._inputs) != self._versions:
                raise RuntimeError(
                    "the effective weight of an adapted layer was read, then its base weight or adapter changed "
                    "in place (an optimizer step, merge, load) before its values were used; read layer.weight "
                    "again after the change (or .clone() it at the read to keep the old values)")
            with torch.set_grad_enabled(self._grad_enabled):
                value = self._compute()
            if value.stride() != self.stride():
                value = value.contiguous()
            self._value = value
        return self._value

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"EffectiveWeight({self.materialize()!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if _writes_in_place(func, args, kwargs):
            raise RuntimeError(_WRITE_MESSAGE.format(getattr(func, "__name__", func)))
        args, kwargs = tree_map(_materialized, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by callers below __torch_function__: autograd has passed, so values only.
        kwargs = kwargs or {}
        if _dispatch_writes(func, args, kwargs):
            raise RuntimeError(_WRITE_MESSAGE.format(func))
        wrappers = [t for t in tree_leaves((args, kwargs)) if isinstance(t, EffectiveWeight)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in wrappers):
            raise RuntimeError(
                f"{func}: the effective weight of an adapted layer reached a kernel without passing through "
                "torch's Python API, so its adapter would get no gradient; call the layer instead of reading "
                "its weight, or read it under torch.no_grad()")
        return func(*tree_map(_materialized, args), **tree_map(_materialized, kwargs))


def _materialized(x):
    return x.materialize() if isinstance(x, EffectiveWeight) else x


def effective(compute: Callable[..., Tensor], weight: Tensor, *args) -> Tensor:
    """``compute(weight, *args)`` (a W-sized ``W + scale·ΔW``) as an ``EffectiveWeight``, computed when used.

    Under ``torch.compile`` the plain tensor, computed now. The result has ``weight``'s dtype, shape and
    device (``functional.effective_weight`` and ``functional.dora_weight`` keep them).
    """
    if torch.compiler.is_compiling():
        return compute(weight, *args)
    inputs = tuple(t for t in (weight, *args) if isinstance(t, Tensor))
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return EffectiveWeight(lambda: compute(weight, *args), inputs, weight, requires_grad)
