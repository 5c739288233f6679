"""Does a module's forward read the *values* of a descendant's weight (``F.linear(x, self.qkv.weight)``)?

PEFT's LoRA only acts when the layer is called; a parent that reads the layer's weight and computes with
it bypasses the adapter. peftlite's own layers are never bypassed (the weight property), but a PEFT
export of such a layer would compute something else, so it is refused. Reads of metadata only
(``self.wo.weight.dtype``, ``.shape``, ``.device``, ``isinstance(self.wo.weight, torch.Tensor)``, as
T5, CLIP and DINOv2 do) are not value reads and are allowed.

The forward's source is parsed (``ast``); without source (a compiled or generated forward) its bytecode,
nested code objects included, is scanned, and only a read followed at once by a metadata attribute or
method counts as harmless. Decorators that keep ``__wrapped__`` (``functools.wraps``) are looked through.
"""

from __future__ import annotations

import ast
import dis
import functools
import inspect
import textwrap
import types
from collections.abc import Iterator

METADATA = frozenset({
    "dtype", "device", "shape", "ndim", "layout", "is_cuda", "is_meta", "requires_grad", "size", "dim",
    "numel", "nelement", "element_size", "itemsize", "nbytes", "is_floating_point", "is_contiguous",
})
_INSPECTORS = frozenset({"isinstance", "type", "hasattr", "id", "callable"})


def _forward(cls: type):
    """``cls.forward`` as a plain function, through decorators that keep ``__wrapped__``."""
    fwd = getattr(cls, "forward", None)
    return inspect.unwrap(getattr(fwd, "__func__", fwd))


@functools.lru_cache(maxsize=256)
def _source_reads(cls: type) -> frozenset[tuple[str, ...]] | None:
    """Every attribute path ``self.a.b.weight`` whose values the forward reads, or None without source."""
    fwd = _forward(cls)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fwd)))
    except (OSError, TypeError, SyntaxError):
        return None
    func = tree.body[0]
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or not func.args.args:
        return None
    me = func.args.args[0].arg
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = set()
    for node in ast.walk(tree):
        path = _path(node, me)
        if not path or path[-1] != "weight" or len(path) < 2 or _harmless(node, parents.get(node)):
            continue
        reads.add(tuple(path))
    return frozenset(reads)


def _path(node: ast.AST, me: str) -> list[str] | None:
    """``self.a.b.weight`` -> ["a", "b", "weight"]; None for anything not rooted at ``self``."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names[::-1] if isinstance(node, ast.Name) and node.id == me and names else None


def _harmless(node: ast.AST, parent: ast.AST | None) -> bool:
    if isinstance(parent, ast.Attribute) and parent.attr in METADATA:
        return True  # self.wo.weight.dtype, .shape, .size()
    if isinstance(parent, ast.Call) and node in parent.args and isinstance(parent.func, ast.Name):
        return parent.func.id in _INSPECTORS  # isinstance(self.wo.weight, torch.Tensor)
    if isinstance(parent, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops):
        return True  # self.wo.weight is None
    return False


def _bytecode_reads(cls: type, path: tuple[str, ...]) -> bool:
    """Without source: is ``self.<path>`` loaded and then used other than by a metadata attribute?"""
    code = getattr(_forward(cls), "__code__", None)
    return code is not None and any(_loads_values(c, path) for c in _codes(code))


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code objects nested in it: comprehensions, generators, lambdas, inner functions."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _loads_values(code: types.CodeType, path: tuple[str, ...]) -> bool:
    ops = [(i.opname, i.argval) for i in dis.get_instructions(code)]
    n = len(path)
    for i in range(len(ops) - n + 1):
        if all(_attribute(op) and arg == want for (op, arg), want in zip(ops[i:i + n], path, strict=True)):
            op, arg = ops[i + n] if i + n < len(ops) else ("", None)
            if not (_attribute(op) and arg in METADATA):
                return True
    return False


def _attribute(opname: str) -> bool:
    """An attribute load: ``LOAD_ATTR`` (any variant), or ``LOAD_METHOD`` before a call on Python 3.11."""
    return opname.startswith("LOAD_ATTR") or opname == "LOAD_METHOD"


def reads_values(cls: type, relative: str) -> bool:
    """Does ``cls.forward`` compute with the values of ``self.<relative>.weight``?"""
    path = (*relative.split("."), "weight")
    reads = _source_reads(cls)
    if reads is None:
        return _bytecode_reads(cls, path)
    return path in reads


def reader_of(model, name: str) -> tuple[str, str] | None:
    """The module enclosing ``name`` whose forward computes with ``name``'s weight values, as ``(its class name,
    the attribute path it reads)``; None when no enclosing forward does.

    A format whose runtime acts only when the layer is called (PEFT, LyCORIS) is bypassed by such a read,
    so a file of that format would not reproduce peftlite's outputs for the layer.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        relative = parts[i:]
        if any(p.isdigit() for p in relative):
            break  # an index (Sequential, ModuleList) cannot be reached as an attribute from here up
        holder = model.get_submodule(".".join(parts[:i]))
        if reads_values(type(holder), ".".join(relative)):
            return type(holder).__name__, ".".join(relative)
    return None
