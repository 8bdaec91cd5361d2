"""Export fix-ups: graph passes that repair known breakages without editing diffusers.

Each is a transform on a :class:`~adatsq.frontend.export.DiTGraph` that must not change results.
"""

from __future__ import annotations

import torch

from ..passes.infra import Pass, PassResult, Pipeline
from .architectures import Adapter
from .complex_rope import LowerComplexToReal

aten = torch.ops.aten


def _static_size(node: torch.fx.Node, dim: int) -> int | None:
    val = node.meta.get("val")
    if val is None:
        return None
    size = val.shape[dim]
    return size if isinstance(size, int) else None


class FxRewrite(Pass):
    """A fix-up that rewrites the ExportedProgram's fx graph in place: subclasses implement
    :meth:`rewrite` (returns whether anything changed); lint and recompile happen here, once."""

    preserves = ("adatsq.layer",)

    def rewrite(self, gm: torch.fx.GraphModule) -> bool:
        raise NotImplementedError

    def call(self, graph):
        gm = graph.program.graph_module
        modified = self.rewrite(gm)
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(graph, modified)


class RemoveNoopSqueeze(FxRewrite):
    """Drop ``squeeze(dim)`` nodes whose squeezed dimensions are not of size 1.

    In torch such a squeeze is a no-op (PixArt's ``hidden_states.squeeze(1)``), but it does not
    survive ONNX: torch 2.13's exporter lowers it to ``prims.view_of`` and fails; older exporters
    emit a ``Squeeze`` with those axes, which onnxruntime refuses as invalid.
    """

    def rewrite(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (aten.squeeze.dim, aten.squeeze.dims):
                continue
            src = node.args[0]
            dims = node.args[1] if len(node.args) > 1 else None
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            rank = len(src.meta["val"].shape)
            sizes = [_static_size(src, d % rank) for d in dims]
            if dims and all(s is not None and s != 1 for s in sizes):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                modified = True
        return modified

    def ensures(self, graph):
        for node in graph.graph.nodes:
            if node.op == "call_function" and node.target in (aten.squeeze.dim, aten.squeeze.dims):
                src = node.args[0]
                dims = node.args[1] if len(node.args) > 1 else []
                dims = [dims] if isinstance(dims, int) else list(dims)
                rank = len(src.meta["val"].shape)
                if dims and all((_static_size(src, d % rank) or 1) != 1 for d in dims):
                    raise AssertionError(f"no-op squeeze {node.name} left in graph")


class CanonicalizeEmptyPermuted(FxRewrite):
    """Rewrite ``empty_permuted(size, identity perm)`` as ``empty(size)``.

    ``empty_like`` decomposes to ``empty_permuted`` (Wan's RoPE writes into an ``empty_like``
    buffer); the ONNX exporter has no lowering for it. Results are unchanged: the buffer is
    fully overwritten, and the identity permutation is the default contiguous layout.
    """

    def rewrite(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is aten.empty_permuted.default:
                size, perm = node.args[0], list(node.args[1])
                if perm != list(range(len(perm))):
                    continue
                kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "layout", "device", "pin_memory")}
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(aten.empty.memory_format, (size,), kwargs)
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                modified = True
        return modified


class IndexWithInt64(FxRewrite):
    """Cast integer index tensors of ``aten.index.Tensor`` to int64.

    torch indexes with int32 tensors (Z-Image's RoPE position ids are int32); ONNX ``GatherND``
    accepts only int64 and onnxruntime refuses such a model. The cast is exact.
    """

    def rewrite(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.index.Tensor:
                continue
            indices = list(node.args[1])
            for k, idx in enumerate(indices):
                val = getattr(idx, "meta", {}).get("val")
                if val is None or val.dtype in (torch.int64, torch.bool) or val.dtype.is_floating_point:
                    continue
                with gm.graph.inserting_before(node):
                    cast = gm.graph.call_function(aten._to_copy.default, (idx,), {"dtype": torch.int64})
                cast.meta = {**{k2: v for k2, v in idx.meta.items() if k2 != "val"}, "val": val.to(torch.int64)}
                indices[k] = cast
                modified = True
            node.args = (node.args[0], indices, *node.args[2:])
        return modified


#: fix-ups every architecture gets, before its own
COMMON_FIXUPS = ("CanonicalizeEmptyPermuted", "IndexWithInt64")
FIXUPS = {"RemoveNoopSqueeze": RemoveNoopSqueeze, "CanonicalizeEmptyPermuted": CanonicalizeEmptyPermuted,
          "IndexWithInt64": IndexWithInt64, "LowerComplexToReal": LowerComplexToReal}


def fixup_pipeline(adapter: Adapter) -> Pipeline:
    names = COMMON_FIXUPS + tuple(adapter.fixups)
    return Pipeline([FIXUPS[name]() for name in names], name=f"fixups[{adapter.arch}]")
