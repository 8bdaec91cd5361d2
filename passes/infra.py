"""Pass infrastructure: passes, results, pipelines, pre/postconditions.

Modelled on torch.fx ``passes/infra`` and onnx-ir's ``_pass_infra``: a pass is a small object with
one entry point, ``call(graph) -> PassResult``; ``__call__`` wraps it with the ``requires`` and
``ensures`` checks, which raise :class:`PreconditionError` / :class:`PostconditionError` naming the
pass. A :class:`Pipeline` is itself a pass.

Passes come in two kinds: *analyses* only annotate (they must leave the graph structure untouched,
which the base class verifies), *transforms* rewrite it and say which annotation keys they keep
(``preserves``); the others are dropped from the graph after the transform, MLIR-style.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Generic, Sequence, TypeVar

G = TypeVar("G")


class PassError(RuntimeError):
    """A pass failed; the message starts with the pass's name."""


class PreconditionError(PassError):
    pass


class PostconditionError(PassError):
    pass


@dataclasses.dataclass(frozen=True)
class PassResult(Generic[G]):
    graph: G
    modified: bool


class Pass(Generic[G]):
    """Base class. Subclasses implement :meth:`call` and optionally :meth:`requires`/:meth:`ensures`."""

    #: "analysis" passes must not change the graph; "transform" passes may.
    kind: ClassVar[str] = "transform"
    #: annotation keys a transform keeps valid (analyses keep everything).
    preserves: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, graph: G) -> None:  # pragma: no cover - default is no check
        """Raise (any exception) if ``graph`` is not a valid input."""

    def ensures(self, graph: G) -> None:  # pragma: no cover - default is no check
        """Raise (any exception) if ``graph`` is not a valid output."""

    def call(self, graph: G) -> PassResult[G]:
        raise NotImplementedError

    def __call__(self, graph: G) -> PassResult[G]:
        try:
            self.requires(graph)
        except PassError:
            raise
        except Exception as exc:
            raise PreconditionError(f"{self.name}: precondition failed: {exc}") from exc
        before = _structure(graph) if self.kind == "analysis" else None
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise PostconditionError(f"{self.name}: call() returned {type(result).__name__}, not PassResult")
        if before is not None and _structure(result.graph) != before:
            raise PostconditionError(f"{self.name}: analysis pass changed the graph structure")
        if self.kind == "transform" and result.modified:
            _drop_unpreserved(result.graph, self.preserves)
        try:
            self.ensures(result.graph)
        except PassError:
            raise
        except Exception as exc:
            raise PostconditionError(f"{self.name}: postcondition failed: {exc}") from exc
        return result


class Pipeline(Pass[G]):
    """Runs passes in order; modified if any pass modified the graph. Records per-pass timings."""

    def __init__(self, passes: Sequence[Pass[G]], name: str | None = None):
        self.passes = list(passes)
        self._name = name
        self.timings: list[tuple[str, float, bool]] = []

    @property
    def name(self) -> str:
        return self._name or f"Pipeline[{', '.join(p.name for p in self.passes)}]"

    def call(self, graph: G) -> PassResult[G]:
        modified = False
        self.timings = []
        for p in self.passes:
            t0 = time.perf_counter()
            res = p(graph)
            self.timings.append((p.name, time.perf_counter() - t0, res.modified))
            graph, modified = res.graph, modified or res.modified
        return PassResult(graph, modified)


def _fx_graph(graph: Any):
    """The torch.fx Graph behind a DiTGraph, an ExportedProgram or a GraphModule (None otherwise)."""
    for attr in ("program", "graph_module"):
        if hasattr(graph, attr):
            graph = getattr(graph, attr)
    return getattr(graph, "graph", None)


def _structure(graph: Any) -> Any:
    g = _fx_graph(graph)
    if g is None:
        return None
    return tuple((n.op, str(n.target), tuple(a.name for a in n.all_input_nodes)) for n in g.nodes)


def _drop_unpreserved(graph: Any, preserves: tuple[str, ...]) -> None:
    from .annotations import NAMESPACE

    g = _fx_graph(graph)
    if g is None:
        return
    for node in g.nodes:
        for key in [k for k in node.meta if k.startswith(NAMESPACE) and k not in preserves]:
            del node.meta[key]
