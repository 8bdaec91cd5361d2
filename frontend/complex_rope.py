"""Lower complex-valued tensors in an exported graph to real tensors (Z-Image's complex RoPE).

Z-Image builds its rotary tables with ``torch.polar`` (complex64), gathers, pads and selects them
per token, and applies them as ``view_as_real(view_as_complex(x) * freqs)``. The ONNX exporter and
most backends have no complex dtype, so :class:`LowerComplexToReal` rewrites every complex value
into real arithmetic that gives the same numbers.

Representation
--------------
A complex tensor ``z`` of shape ``S`` and dtype ``complexNN`` is represented by the real tensor
``torch.view_as_real(z)``: shape ``S + [2]``, dtype ``floatNN``, real part at ``[..., 0]`` and
imaginary part at ``[..., 1]``. With that choice

* ``view_as_complex(x)`` becomes ``x`` and ``view_as_real(z)`` becomes (the representation of) ``z``:
  the RoPE round trip disappears;
* layout ops act on the leading dimensions only: a negative ``dim`` shifts by one (``-1`` -> ``-2``),
  ``view``/``expand`` sizes get a trailing ``2``, ``permute`` keeps the new dimension last,
  ``repeat`` repeats it once, ``constant_pad_nd`` pads it by ``[0, 0]``; indexing, slicing,
  splitting and concatenation carry it along untouched;
* ``where(c, a, b)`` broadcasts ``c.unsqueeze(-1)``; a real tensor meeting a complex one in ``cat``,
  ``where``, ``add`` or ``sub`` is first promoted to ``stack([r, 0], -1)``, as torch promotes it;
* arithmetic is done on the components: ``(a+bi)(c+di) = (ac-bd) + (ad+bc)i``, ``polar(r, t) =
  stack([r cos t, r sin t], -1)``, ``conj`` negates the imaginary part; multiplying or dividing by
  a real tensor ``r`` is the same op with ``r.unsqueeze(-1)``;
* complex ``full``/``full_like`` become real fills of the real and imaginary parts, ``_to_copy`` to a
  complex dtype becomes a copy to the matching real dtype (a real source gets a zero imaginary
  part; a cast of a complex value to a real dtype keeps the real part, as torch does).

All rewrites use the float operations torch's complex kernels do, so results agree to a few ulps
(tiny Z-Image: 6e-7 max abs diff against the complex program, outputs of magnitude ~2).

Complex lifted constants and buffers (a RoPE cache populated before export is lifted into
``program.constants``) are replaced by their real view (``view_as_real(t).clone()``) and their
placeholders re-typed. Complex *user* inputs and outputs, and complex parameters, change the
program's interface and are refused in :meth:`LowerComplexToReal.requires`, as is any op on
complex values without a rule here (the error names the op and the node).

Node metadata: the rewrite keeps every original node that does not touch complex values (names,
``nn_module_stack``, ``adatsq.*`` annotations); new nodes copy the metadata of the node they
replace (except its value). ``meta["val"]``/``meta["tensor_meta"]`` are then recomputed for the
whole graph with :class:`torch.fx.passes.fake_tensor_prop.FakeTensorProp`, starting from the
placeholders' own fake tensors (so symbolic shapes stay in the program's ShapeEnv), under the Python
dispatcher as torch.export does (see :func:`refresh_meta`). The program is not re-traced, so
parameter placeholders, their ``transformer.*`` targets and ``aten.linear`` nodes are untouched.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export.graph_signature import InputKind, TensorArgument
from torch.fx import Graph, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..passes.infra import Pass, PassResult

if TYPE_CHECKING:
    from .export import DiTGraph

aten = torch.ops.aten

__all__ = ["LowerComplexToReal", "complex_nodes", "SUPPORTED_OPS"]

#: ops that act on the representation exactly as on the complex value (``neg`` negates both parts).
_UNARY_RELAY = (aten.alias.default, aten.clone.default, aten.detach.default, aten.lift_fresh_copy.default,
                aten.resolve_conj.default, aten.resolve_neg.default, aten.neg.default)
#: metadata that describes a node's *value*, so is not copied to the nodes replacing it.
_VALUE_META = frozenset({"val", "tensor_meta", "unbacked_bindings", "example_value", "original_aten", "seq_nr"})


# --------------------------------------------------------------------------- value inspection
def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _is_complex_val(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return val.is_complex()
    if isinstance(val, (list, tuple)):
        return any(_is_complex_val(v) for v in val)
    return False


def _is_complex(arg: Any) -> bool:
    """A node whose value is complex (a tensor, or a list of them for ``split``)."""
    return isinstance(arg, Node) and _is_complex_val(_val(arg))


def _is_real_tensor(arg: Any) -> bool:
    v = _val(arg)
    return isinstance(v, torch.Tensor) and not v.is_complex()


def _is_tensor(arg: Any) -> bool:
    return isinstance(_val(arg), torch.Tensor)


def _touches_complex(node: Node) -> bool:
    return _is_complex(node) or any(_is_complex(a) for a in node.all_input_nodes)


def complex_nodes(graph: Graph) -> list[Node]:
    """Nodes whose value is complex."""
    return [n for n in graph.nodes if _is_complex(n)]


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _cdim(dim: int) -> int:
    """A dim of a complex tensor as a dim of its representation (negative dims skip the new last dim)."""
    return dim - 1 if dim < 0 else dim


def _rank(node: Node) -> int:
    return _val(node).dim()


def _arg(node: Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _parts(value: Any) -> tuple[Any, Any]:
    """(real, imag) of a Python scalar (a SymInt/SymFloat node counts as real)."""
    if isinstance(value, complex):
        return value.real, value.imag
    return value, 0.0


# --------------------------------------------------------------------------- the rewriter
class _Lowering:
    """Rewrites one graph; ``result`` maps each rewritten node to what replaces it (for a complex
    node: its real representation)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.result: dict[Node, Node] = {}
        self.current: Node | None = None
        self._components: dict[tuple[Node, int], Node] = {}

    # -- node construction
    def emit(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Node:
        assert self.current is not None
        with self.graph.inserting_before(self.current):
            node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta.update({k: v for k, v in self.current.meta.items() if k not in _VALUE_META})
        return node

    def low(self, arg: Any) -> Any:
        """``arg`` with rewritten nodes replaced (complex nodes by their representation)."""
        return torch.fx.map_arg(arg, lambda n: self.result.get(n, n))

    def kwargs(self, node: Node, drop: Iterable[str] = ()) -> dict[str, Any]:
        """``node``'s keyword args, lowered, as a plain (mutable) dict."""
        return {k: self.low(v) for k, v in node.kwargs.items() if k not in drop}

    def component(self, arg: Node, which: int) -> Node:
        """Real (0) or imaginary (1) part of a complex node, as a real tensor of the complex shape."""
        key = (arg, which)
        if key not in self._components:
            self._components[key] = self.emit(aten.select.int, self.low(arg), -1, which)
        return self._components[key]

    def stack(self, re: Any, im: Any) -> Node:
        """The representation ``stack([re, im], -1)`` of two real tensors of one shape."""
        return self.emit(aten.cat.default, [self.emit(aten.unsqueeze.default, re, -1),
                                            self.emit(aten.unsqueeze.default, im, -1)], -1)

    def as_repr(self, arg: Node) -> Node:
        """The representation of a tensor node, promoting a real tensor to complex (zero imaginary)."""
        if _is_complex(arg):
            return self.low(arg)
        real = self.low(arg)
        return self.stack(real, self.emit(aten.full_like.default, real, 0))

    def mul(self, a: Any, b: Any) -> Any:
        return self.emit(aten.mul.Tensor, a, b)

    # -- driver
    def run(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            self.current = node
            self.result[node] = _RULES[node.target](self, node)
        self.current = None


# --------------------------------------------------------------------------- rules
Rule = Callable[[_Lowering, Node], Node]


def _rule_view_as_complex(lw: _Lowering, node: Node) -> Node:
    return lw.low(node.args[0])


def _rule_view_as_real(lw: _Lowering, node: Node) -> Node:
    return lw.low(node.args[0])


def _rule_polar(lw: _Lowering, node: Node) -> Node:
    mag, angle = lw.low(node.args[0]), lw.low(node.args[1])
    return lw.stack(lw.mul(mag, lw.emit(aten.cos.default, angle)), lw.mul(mag, lw.emit(aten.sin.default, angle)))


def _rule_complex(lw: _Lowering, node: Node) -> Node:
    return lw.stack(lw.low(node.args[0]), lw.low(node.args[1]))


def _layout_free(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop a ``memory_format`` other than contiguous/preserve (channels_last refers to the complex rank)."""
    if kwargs.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
        del kwargs["memory_format"]
    return kwargs


def _rule_relay(lw: _Lowering, node: Node) -> Node:
    return lw.emit(node.target, *lw.low(node.args), **_layout_free(lw.kwargs(node)))


def _rule_conj(lw: _Lowering, node: Node) -> Node:
    src = node.args[0]
    return lw.stack(lw.component(src, 0), lw.emit(aten.neg.default, lw.component(src, 1)))


def _with_args(lw: _Lowering, node: Node, changes: dict[int, Any], *, moved: Sequence[str] = ()) -> Node:
    """Re-emit ``node`` on lowered args with positional args replaced (``changes``); keyword args
    named in ``moved`` are dropped (their new value is among ``changes``)."""
    args = list(lw.low(node.args))
    args += [None] * (max([len(args), *[i + 1 for i in changes]]) - len(args))
    for i, v in changes.items():
        args[i] = v
    return lw.emit(node.target, *args, **lw.kwargs(node, drop=moved))


def _dim_rule(pos: int, name: str = "dim", default: int = 0, *, many: bool = False) -> Rule:
    """Ops with one dim (or a list of dims, ``many``) at ``pos`` counting over the complex dims."""

    def rule(lw: _Lowering, node: Node) -> Node:
        dim = _arg(node, pos, name, default)
        return _with_args(lw, node, {pos: [_cdim(d) for d in dim] if many else _cdim(dim)}, moved=(name,))

    return rule


def _sizes_rule(pos: int, extra: int) -> Rule:
    """Ops whose arg ``pos`` lists one size per complex dim (``view``, ``expand``, ``repeat``)."""

    def rule(lw: _Lowering, node: Node) -> Node:
        return _with_args(lw, node, {pos: [*lw.low(node.args[pos]), extra]})

    return rule


def _rule_permute(lw: _Lowering, node: Node) -> Node:
    rank = _rank(node.args[0])
    return _with_args(lw, node, {1: [d % rank for d in node.args[1]] + [rank]})


def _rule_squeeze(lw: _Lowering, node: Node) -> Node:
    if node.target is aten.squeeze.default:  # the representation's last dim is 2, never squeezed
        return _with_args(lw, node, {})
    dims = node.args[1]
    return _with_args(lw, node, {1: _cdim(dims) if isinstance(dims, int) else [_cdim(d) for d in dims]})


def _rule_transpose(lw: _Lowering, node: Node) -> Node:
    return _with_args(lw, node, {1: _cdim(node.args[1]), 2: _cdim(node.args[2])})


def _rule_roll(lw: _Lowering, node: Node) -> Node:
    return _with_args(lw, node, {2: [_cdim(d) for d in node.args[2]]})


def _rule_cat(lw: _Lowering, node: Node) -> Node:
    """``cat``/``stack``: real members are promoted, as torch's type promotion does."""
    tensors = [lw.as_repr(t) for t in node.args[0]]
    return lw.emit(node.target, tensors, _cdim(_arg(node, 1, "dim", 0)))


def _rule_index(lw: _Lowering, node: Node) -> Node:
    """``index.Tensor``: the indices address leading dims, the (real, imag) dim rides along."""
    return _with_args(lw, node, {})


def _rule_constant_pad_nd(lw: _Lowering, node: Node) -> Node:
    src, pad, value = node.args[0], list(node.args[1]), _arg(node, 2, "value", 0)
    re, im = _parts(value)
    if re == im:  # (0 in practice) both components padded with the same value
        return lw.emit(aten.constant_pad_nd.default, lw.low(src), [0, 0, *pad], re)
    return lw.stack(lw.emit(aten.constant_pad_nd.default, lw.component(src, 0), pad, re),
                    lw.emit(aten.constant_pad_nd.default, lw.component(src, 1), pad, im))


def _rule_where(lw: _Lowering, node: Node) -> Node:
    cond = lw.emit(aten.unsqueeze.default, lw.low(node.args[0]), -1)
    return lw.emit(aten.where.self, cond, lw.as_repr(node.args[1]), lw.as_repr(node.args[2]))


def _rule_scatter_like(lw: _Lowering, node: Node) -> Node:
    """``slice_scatter(x, src, dim, ...)`` / ``select_scatter(x, src, dim, index)``."""
    args = list(lw.low(node.args))
    args[0], args[1] = lw.as_repr(node.args[0]), lw.as_repr(node.args[1])
    if len(args) > 2:
        args[2] = _cdim(args[2])
    kwargs = lw.kwargs(node)
    if "dim" in kwargs:
        kwargs["dim"] = _cdim(kwargs["dim"])
    return lw.emit(node.target, *args, **kwargs)


def _rule_index_put(lw: _Lowering, node: Node) -> Node:
    args = list(lw.low(node.args))
    args[0], args[2] = lw.as_repr(node.args[0]), lw.as_repr(node.args[2])
    return lw.emit(node.target, *args, **lw.kwargs(node))


def _rule_copy(lw: _Lowering, node: Node) -> Node:
    """``copy(dst, src)`` (functionalized in-place writes): ``src`` broadcast into ``dst``'s shape."""
    return lw.emit(node.target, lw.as_repr(node.args[0]), lw.as_repr(node.args[1]), *node.args[2:],
                   **lw.kwargs(node))


def _rule_getitem(lw: _Lowering, node: Node) -> Node:
    return lw.emit(operator.getitem, lw.low(node.args[0]), node.args[1])


def _rule_full(lw: _Lowering, node: Node) -> Node:
    size, value = lw.low(node.args[0]), node.args[1]
    kwargs = dict(lw.kwargs(node), dtype=_real_dtype(_val(node).dtype))
    re, im = _parts(value)
    if re == im:
        return lw.emit(aten.full.default, [*size, 2], re, **kwargs)
    return lw.stack(lw.emit(aten.full.default, size, re, **kwargs), lw.emit(aten.full.default, size, im, **kwargs))


def _rule_full_like(lw: _Lowering, node: Node) -> Node:
    src, value = node.args[0], node.args[1]
    kwargs = dict(lw.kwargs(node), dtype=_real_dtype(_val(node).dtype))
    if not _is_complex(node):  # complex source, real fill
        return lw.emit(aten.full_like.default, lw.component(src, 0), value, **kwargs)
    base = lw.component(src, 0) if _is_complex(src) else lw.low(src)
    re, im = _parts(value)
    return lw.stack(lw.emit(aten.full_like.default, base, re, **kwargs),
                    lw.emit(aten.full_like.default, base, im, **kwargs))


def _rule_to_copy(lw: _Lowering, node: Node) -> Node:
    src = node.args[0]
    kwargs = _layout_free(lw.kwargs(node))
    if "dtype" in kwargs:
        kwargs["dtype"] = _real_dtype(kwargs["dtype"])
    if not _is_complex(src):  # real -> complex: zero imaginary part
        real = lw.emit(aten._to_copy.default, lw.low(src), **kwargs)
        return lw.stack(real, lw.emit(aten.full_like.default, real, 0))
    if not _is_complex(node):  # complex -> real: torch keeps the real part
        return lw.emit(aten._to_copy.default, lw.component(src, 0), **kwargs)
    return lw.emit(aten._to_copy.default, lw.low(src), **kwargs)


def _rule_assert_metadata(lw: _Lowering, node: Node) -> Node:
    src = node.args[0]
    size = _arg(node, 1, "size", None)
    dtype = _arg(node, 3, "dtype", None)
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "stride", "dtype")}
    return lw.emit(node.target, lw.low(src), None if size is None else [*lw.low(size), 2], None,
                   None if dtype is None else _real_dtype(dtype), **kwargs)


def _rule_sym_size(lw: _Lowering, node: Node) -> Node:
    return lw.emit(node.target, lw.low(node.args[0]), _cdim(node.args[1]))


def _rule_add_sub(lw: _Lowering, node: Node) -> Node:
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    if _is_tensor(a) and _is_tensor(b):  # broadcasting tensors: add the representations
        kwargs = {} if alpha == 1 else {"alpha": alpha}
        return lw.emit(node.target, lw.as_repr(a), lw.as_repr(b), **kwargs)
    # tensor (op) scalar, component-wise: (ar + i ai) +- alpha (br + i bi)
    br, bi = _parts(b)
    if alpha != 1:
        br = lw.emit(operator.mul, br, alpha) if isinstance(br, Node) else br * alpha  # a SymFloat node
        bi = bi * alpha
    op = aten.add.Tensor if node.target in (aten.add.Tensor, aten.add.Scalar) else aten.sub.Tensor
    if _is_complex(a):
        ar, ai = lw.component(a, 0), lw.component(a, 1)
        re = lw.emit(op, ar, br)
        im = ai if bi == 0 else lw.emit(op, ai, bi)
    else:  # real tensor, complex scalar
        ar = lw.low(a)
        re = lw.emit(op, ar, br)
        im = lw.emit(aten.full_like.default, re, bi if op is aten.add.Tensor else -bi)
    return lw.stack(re, im)


def _rule_mul(lw: _Lowering, node: Node) -> Node:
    a, b = node.args[0], node.args[1]
    if _is_complex(b) and not _is_complex(a):
        a, b = b, a  # multiplication commutes: ``a`` is complex whenever an operand is
    if not _is_complex(a):  # real tensor * complex Python scalar
        tensor, scalar = (a, b) if _is_tensor(a) else (b, a)
        sr, si = _parts(scalar)
        return lw.stack(lw.mul(lw.low(tensor), sr), lw.mul(lw.low(tensor), si))
    if _is_real_tensor(b):
        return lw.mul(lw.low(a), lw.emit(aten.unsqueeze.default, lw.low(b), -1))
    if not _is_complex(b) and not isinstance(b, complex):  # real scalar
        return lw.mul(lw.low(a), lw.low(b))
    ar, ai = lw.component(a, 0), lw.component(a, 1)
    br, bi = (lw.component(b, 0), lw.component(b, 1)) if _is_complex(b) else _parts(b)
    # (ar + i ai)(br + i bi) = (ar br - ai bi) + i (ar bi + ai br)
    re = lw.emit(aten.sub.Tensor, lw.mul(ar, br), lw.mul(ai, bi))
    im = lw.emit(aten.add.Tensor, lw.mul(ar, bi), lw.mul(ai, br))
    return lw.stack(re, im)


def _rule_div(lw: _Lowering, node: Node) -> Node:
    a, b = node.args[0], node.args[1]
    divisor = lw.emit(aten.unsqueeze.default, lw.low(b), -1) if _is_tensor(b) else lw.low(b)
    return lw.emit(aten.div.Tensor, lw.low(a), divisor, **dict(node.kwargs))


#: the rewrite of each supported op (``_unsupported`` says which uses of them are refused).
_RULES: dict[Any, Rule] = {
    aten.view_as_complex.default: _rule_view_as_complex,
    aten.view_as_real.default: _rule_view_as_real,
    aten.polar.default: _rule_polar,
    aten.complex.default: _rule_complex,
    **{op: _rule_relay for op in _UNARY_RELAY},
    aten.conj_physical.default: _rule_conj,
    aten._conj.default: _rule_conj,
    aten._conj_physical.default: _rule_conj,
    aten.unsqueeze.default: _dim_rule(1),
    aten.select.int: _dim_rule(1),
    aten.slice.Tensor: _dim_rule(1),
    aten.index_select.default: _dim_rule(1),
    aten.split.Tensor: _dim_rule(2),
    aten.split_with_sizes.default: _dim_rule(2),
    aten.unbind.int: _dim_rule(1),
    aten.flip.default: _dim_rule(1, "dims", many=True),
    aten.roll.default: _rule_roll,
    aten.squeeze.default: _rule_squeeze,
    aten.squeeze.dim: _rule_squeeze,
    aten.squeeze.dims: _rule_squeeze,
    aten.transpose.int: _rule_transpose,
    aten.permute.default: _rule_permute,
    aten.view.default: _sizes_rule(1, 2),
    aten._unsafe_view.default: _sizes_rule(1, 2),
    aten.reshape.default: _sizes_rule(1, 2),
    aten.expand.default: _sizes_rule(1, 2),
    aten.repeat.default: _sizes_rule(1, 1),
    aten.cat.default: _rule_cat,
    aten.stack.default: _rule_cat,
    aten.constant_pad_nd.default: _rule_constant_pad_nd,
    aten.index.Tensor: _rule_index,
    aten.index_put.default: _rule_index_put,
    aten.copy.default: _rule_copy,
    aten.slice_scatter.default: _rule_scatter_like,
    aten.select_scatter.default: _rule_scatter_like,
    aten.where.self: _rule_where,
    aten.full.default: _rule_full,
    aten.full_like.default: _rule_full_like,
    aten._to_copy.default: _rule_to_copy,
    aten._assert_tensor_metadata.default: _rule_assert_metadata,
    aten.sym_size.int: _rule_sym_size,
    aten.add.Tensor: _rule_add_sub,
    aten.sub.Tensor: _rule_add_sub,
    aten.add.Scalar: _rule_add_sub,
    aten.sub.Scalar: _rule_add_sub,
    aten.mul.Tensor: _rule_mul,
    aten.mul.Scalar: _rule_mul,
    aten.div.Tensor: _rule_div,
    aten.div.Scalar: _rule_div,
    operator.getitem: _rule_getitem,
}

#: the ops (``OpOverload``s, and ``operator.getitem``) that may touch complex values.
SUPPORTED_OPS: frozenset[Any] = frozenset(_RULES)


def _op_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _unsupported(node: Node) -> str | None:
    """Why ``node`` (which touches complex values) cannot be lowered, or None."""
    op = _op_name(node.target)
    if node.op != "call_function" or node.target not in _RULES:
        return f"op {op} (node {node.name}) on complex values is not supported"
    args = node.args
    if node.target in (aten.div.Tensor, aten.div.Scalar) and (_is_complex(args[1]) or isinstance(args[1], complex)):
        return f"op {op} (node {node.name}): division by a complex value is not supported"
    if node.target in (aten.div.Tensor, aten.div.Scalar) and not _is_complex(args[0]):
        return f"op {op} (node {node.name}): division of a real value by a complex scalar is not supported"
    if node.target in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(alpha, complex) or isinstance(alpha, Node):
            return f"op {op} (node {node.name}): a complex or symbolic alpha is not supported"
        if not _is_tensor(args[0]):
            return f"op {op} (node {node.name}): a scalar first operand is not supported"
    if node.target is aten.complex.default and tuple(_val(args[0]).shape) != tuple(_val(args[1]).shape):
        return f"op {op} (node {node.name}): broadcasting real and imaginary parts is not supported"
    if node.target is aten.roll.default and not _arg(node, 2, "dims", []):
        return f"op {op} (node {node.name}): roll over the flattened tensor is not supported"
    return None


# --------------------------------------------------------------------------- the pass
@dataclasses.dataclass
class _Placeholders:
    lifted: list[Node]  # complex constants / buffers to convert
    refused: list[str]  # complex inputs that change the interface


def _classify_placeholders(program: torch.export.ExportedProgram) -> _Placeholders:
    specs = {s.arg.name: s for s in program.graph_signature.input_specs if hasattr(s.arg, "name")}
    lifted, refused = [], []
    for node in program.graph.find_nodes(op="placeholder"):
        if not _is_complex(node):
            continue
        spec = specs.get(node.name)
        if spec is not None and spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.BUFFER):
            lifted.append(node)
        else:
            kind = spec.kind.name.lower() if spec is not None else "input"
            refused.append(f"complex {kind} {node.name}")
    return _Placeholders(lifted, refused)


class LowerComplexToReal(Pass):
    """Rewrite every complex tensor as a real tensor with a trailing (real, imag) dimension.

    See the module docstring for the representation and the op rules. ``modified`` is False when
    the graph holds no complex value. Preconditions (checked before anything changes): every node
    touching a complex value is a supported op, and no user input, user output or parameter is
    complex. Postcondition: no node's value is complex and no ``view_as_complex``,
    ``view_as_real`` or ``polar`` node is left.
    """

    preserves = ("adatsq.layer",)

    def requires(self, graph: DiTGraph) -> None:
        program = graph.program
        problems = list(_classify_placeholders(program).refused)
        for node in program.graph.nodes:
            if node.op == "output":
                outputs = node.args[0]
                for arg in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
                    if _is_complex(arg):
                        problems.append(f"complex graph output {arg.name}")
            elif node.op != "placeholder" and _touches_complex(node):
                why = _unsupported(node)
                if why is not None:
                    problems.append(why)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"cannot lower complex values to real: {shown}")

    def call(self, graph: DiTGraph) -> PassResult[DiTGraph]:
        program: torch.export.ExportedProgram = graph.program
        gm = program.graph_module
        fx_graph = gm.graph
        if not any(_is_complex(n) for n in fx_graph.nodes):
            return PassResult(graph, False)

        lifted = _classify_placeholders(program).lifted
        todo = [n for n in fx_graph.nodes if n.op not in ("placeholder", "output") and _touches_complex(n)]
        lowering = _Lowering(fx_graph)
        lowering.run(todo)  # reads the original (complex) values, so runs before anything is re-typed
        _convert_lifted(program, lifted)  # lifted placeholders now hold the representation itself

        for node in reversed(todo):  # users first, so each node is unused when erased
            node.replace_all_uses_with(lowering.result[node])
            fx_graph.erase_node(node)
        _sync_output_names(program)
        fx_graph.lint()
        gm.recompile()
        refresh_meta(program)
        program.validate()  # torch.export's verifier: signature, placeholders and op set still agree
        return PassResult(graph, True)

    def ensures(self, graph: DiTGraph) -> None:
        left = complex_nodes(graph.program.graph)
        if left:
            raise AssertionError(f"complex values left: {', '.join(n.name for n in left[:5])}")
        banned = (aten.view_as_complex.default, aten.view_as_real.default, aten.polar.default)
        ops = [n.name for n in graph.program.graph.nodes if n.op == "call_function" and n.target in banned]
        if ops:
            raise AssertionError(f"complex ops left: {', '.join(ops[:5])}")


def _fake_mode(program: torch.export.ExportedProgram) -> FakeTensorMode:
    """The FakeTensorMode (and so the ShapeEnv) of the program's placeholder values."""

    vals = [n.meta["val"] for n in program.graph.find_nodes(op="placeholder") if "val" in n.meta]
    mode = detect_fake_mode(vals)
    return mode if mode is not None else FakeTensorMode()


def _convert_lifted(program: torch.export.ExportedProgram, nodes: list[Node]) -> None:
    """Replace complex lifted constants/buffers by their real view and re-type their placeholders."""
    if not nodes:
        return
    mode = _fake_mode(program)
    specs = {s.arg.name: s for s in program.graph_signature.input_specs if hasattr(s.arg, "name")}
    for node in nodes:
        spec = specs[node.name]
        store = program.constants if spec.kind is InputKind.CONSTANT_TENSOR or spec.target in program.constants \
            else program.state_dict
        value = torch.view_as_real(store[spec.target].resolve_conj()).clone()
        store[spec.target] = value
        node.meta["val"] = mode.from_tensor(value, static_shapes=True)
        node.meta["tensor_meta"] = _extract_tensor_metadata(node.meta["val"])


def _sync_output_names(program: torch.export.ExportedProgram) -> None:
    """Point the signature's output specs at the output node's args again (rewrites renamed some)."""
    output = program.graph.output_node()
    args = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    for spec, arg in zip(program.graph_signature.output_specs, args):
        if isinstance(spec.arg, TensorArgument) and isinstance(arg, Node) and spec.arg.name != arg.name:
            spec.arg = TensorArgument(name=arg.name)


def refresh_meta(program: torch.export.ExportedProgram) -> None:
    """Recompute ``meta["val"]`` (and ``tensor_meta``) of every node by fake-tensor propagation from
    the placeholders' fake values, in the program's own FakeTensorMode/ShapeEnv.

    The Python dispatcher is on, as in torch.export's own tracing: without it some ops (e.g.
    ``constant_pad_nd``) run their C++ meta kernel, which reads concrete sizes and would specialize
    the program's dynamic dimensions to the example sizes (in the ShapeEnv the program shares).
    """
    gm = program.graph_module
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    vals = [p.meta["val"] for p in placeholders]
    shapes = [_shape_str(v) for v in vals]
    with enable_python_dispatcher():
        FakeTensorProp(gm, _fake_mode(program)).propagate_dont_convert_inputs(*vals)
    specialized = [p.name for p, v, before in zip(placeholders, vals, shapes) if _shape_str(v) != before]
    if specialized:
        raise RuntimeError(f"re-propagating shapes specialized dynamic dims of {', '.join(specialized)}")
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(val)
        else:
            node.meta.pop("tensor_meta", None)


def _shape_str(val: Any) -> tuple[str, ...] | None:
    return tuple(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else None
