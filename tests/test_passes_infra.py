"""Pass infrastructure: modified flags, pre/postconditions, analysis checks, annotation dropping, pipelines.

Each test builds its own tiny graph (torch.fx.symbolic_trace or torch.export of a small module) and
checks, in order: the ``modified`` flag, the graph structure (op counts), then the numbers.
"""

from __future__ import annotations

import collections
import dataclasses
import operator

import pytest
import torch
from torch import nn

from adatsq.passes.annotations import annotate, get_annotation, register_annotation
from adatsq.passes.infra import (Pass, PassError, PassResult, Pipeline, PostconditionError, PreconditionError)

pytestmark = pytest.mark.usefixtures("seeded")


@register_annotation("adatsq.test_infra_note")
@dataclasses.dataclass(frozen=True)
class Note:
    text: str


@register_annotation("adatsq.test_infra_keep")
@dataclasses.dataclass(frozen=True)
class Keep:
    value: int


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x) * 1.0
        y = torch.relu(y) * 1.0
        return y + x


def tiny_graph():
    torch.manual_seed(0)
    module = Tiny().eval()
    gm = torch.fx.symbolic_trace(module)
    x = torch.randn(3, 4)
    return gm, x, module(x)


def counts(gm) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op in ("call_function", "call_module"))


def _is_mul_by_one(node) -> bool:
    return node.op == "call_function" and node.target is operator.mul and node.args[1] == 1.0


class RemoveMulByOne(Pass):
    """A real transform: ``x * 1.0`` -> ``x``."""

    preserves = ("adatsq.test_infra_keep",)

    def call(self, gm):
        modified = False
        for node in list(gm.graph.nodes):
            if _is_mul_by_one(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm):
        assert not any(_is_mul_by_one(n) for n in gm.graph.nodes), "x * 1.0 left"


class Noop(Pass):
    def call(self, gm):
        return PassResult(gm, False)


# --------------------------------------------------------------------------- transforms
def test_transform_reports_modified_and_rewrites():
    gm, x, ref = tiny_graph()
    assert counts(gm)[operator.mul] == 2

    result = RemoveMulByOne()(gm)

    assert result.modified is True
    c = counts(result.graph)
    assert c[operator.mul] == 0
    assert c["lin"] == 1 and c[torch.relu] == 1 and c[operator.add] == 1
    assert torch.equal(result.graph(x), ref)
    # a second run finds nothing to do
    again = RemoveMulByOne()(result.graph)
    assert again.modified is False
    assert counts(again.graph) == c


def test_noop_pass_is_unmodified():
    gm, x, ref = tiny_graph()
    before = counts(gm)
    result = Noop()(gm)
    assert result.modified is False and result.graph is gm
    assert counts(result.graph) == before
    assert torch.equal(result.graph(x), ref)


def test_base_pass_call_is_abstract():
    gm, _, _ = tiny_graph()
    with pytest.raises(NotImplementedError):
        Pass()(gm)


def test_transform_drops_unpreserved_annotations():
    gm, _, _ = tiny_graph()
    lin = next(n for n in gm.graph.nodes if n.op == "call_module")
    annotate(lin, Note("dropped"))
    annotate(lin, Keep(7))
    lin.meta["user_key"] = "not ours"

    assert RemoveMulByOne()(gm).modified is True

    assert get_annotation(lin, Note) is None, "not in preserves: dropped after a modifying transform"
    assert get_annotation(lin, Keep) == Keep(7)
    assert lin.meta["user_key"] == "not ours", "keys outside the adatsq namespace are untouched"


def test_unmodified_transform_keeps_all_annotations():
    gm, _, _ = tiny_graph()
    lin = next(n for n in gm.graph.nodes if n.op == "call_module")
    annotate(lin, Note("kept"))
    assert Noop()(gm).modified is False
    assert get_annotation(lin, Note) == Note("kept")


# --------------------------------------------------------------------------- pre/postconditions
class NeedsRelu(Pass):
    called = False

    def requires(self, gm):
        if not any(n.target is torch.relu for n in gm.graph.nodes):
            raise ValueError("graph has no relu")

    def call(self, gm):
        self.called = True
        return PassResult(gm, False)


def test_precondition_error_names_the_pass():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    p = NeedsRelu()
    with pytest.raises(PreconditionError) as info:
        p(gm)
    assert str(info.value).startswith("NeedsRelu: precondition failed")
    assert "graph has no relu" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    assert p.called is False, "call() must not run when the precondition fails"
    # satisfied precondition: runs
    gm2, _, _ = tiny_graph()
    assert NeedsRelu()(gm2).modified is False


class BreaksPostcondition(Pass):
    def call(self, gm):
        return PassResult(gm, False)

    def ensures(self, gm):
        raise RuntimeError("output has 3 dangling nodes")


def test_postcondition_error_names_the_pass():
    gm, _, _ = tiny_graph()
    with pytest.raises(PostconditionError, match=r"^BreaksPostcondition: postcondition failed: output has 3"):
        BreaksPostcondition()(gm)


def test_pass_errors_propagate_unwrapped():
    class Inner(Pass):
        def requires(self, gm):
            raise PreconditionError("Inner: custom precondition")

        def call(self, gm):  # pragma: no cover - never reached
            raise AssertionError

    gm, _, _ = tiny_graph()
    with pytest.raises(PreconditionError, match=r"^Inner: custom precondition$"):
        Inner()(gm)


def test_call_must_return_pass_result():
    class ReturnsGraph(Pass):
        def call(self, gm):
            return gm

    gm, _, _ = tiny_graph()
    with pytest.raises(PostconditionError, match=r"^ReturnsGraph: call\(\) returned \w+, not PassResult"):
        ReturnsGraph()(gm)


# --------------------------------------------------------------------------- analyses
class CountLinears(Pass):
    kind = "analysis"

    def call(self, gm):
        for n in gm.graph.nodes:
            if n.op == "call_module":
                annotate(n, Note("linear"))
        return PassResult(gm, False)


class SneakyAnalysis(Pass):
    """Claims to be an analysis but removes ``* 1.0`` nodes."""

    kind = "analysis"

    def call(self, gm):
        return PassResult(RemoveMulByOne().call(gm).graph, False)


class RewiringAnalysis(Pass):
    """Same nodes, but one input rewired: a structural change too."""

    kind = "analysis"

    def call(self, gm):
        add = next(n for n in gm.graph.nodes if n.target is operator.add)
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        add.args = (x, x)
        return PassResult(gm, False)


def test_annotating_analysis_is_allowed():
    gm, x, ref = tiny_graph()
    before = counts(gm)
    result = CountLinears()(gm)
    assert result.modified is False
    assert counts(result.graph) == before
    assert [get_annotation(n, Note) for n in gm.graph.nodes if n.op == "call_module"] == [Note("linear")]
    assert torch.equal(result.graph(x), ref)


@pytest.mark.parametrize("cls", [SneakyAnalysis, RewiringAnalysis])
def test_analysis_that_mutates_is_caught(cls):
    gm, _, _ = tiny_graph()
    with pytest.raises(PostconditionError, match=f"^{cls.__name__}: analysis pass changed the graph structure"):
        cls()(gm)


def test_analysis_check_on_exported_program():
    torch.manual_seed(0)
    ep = torch.export.export(Tiny().eval(), (torch.randn(3, 4),))
    n_nodes = len(ep.graph.nodes)

    class EraseOutputUse(Pass):
        kind = "analysis"

        def call(self, program):
            out = next(n for n in program.graph.nodes if n.op == "output")
            with program.graph.inserting_before(out):
                program.graph.call_function(torch.ops.aten.relu.default, (out.args[0][0],))
            return PassResult(program, False)

    with pytest.raises(PostconditionError, match="EraseOutputUse: analysis pass changed"):
        EraseOutputUse()(ep)
    assert len(ep.graph.nodes) == n_nodes + 1


# --------------------------------------------------------------------------- pipelines
def test_pipeline_modified_is_any_of_its_passes():
    gm, x, ref = tiny_graph()
    assert Pipeline([Noop(), Noop()])(gm).modified is False
    pipe = Pipeline([Noop(), RemoveMulByOne(), Noop()])
    result = pipe(gm)
    assert result.modified is True
    assert counts(result.graph)[operator.mul] == 0
    assert torch.equal(result.graph(x), ref)
    assert [(name, mod) for name, _, mod in pipe.timings] == [("Noop", False), ("RemoveMulByOne", True),
                                                              ("Noop", False)]
    assert all(t >= 0 for _, t, _ in pipe.timings)
    # run again: nothing left to do, timings are reset not appended
    assert pipe(result.graph).modified is False
    assert len(pipe.timings) == 3


def test_pipeline_names():
    assert Pipeline([Noop(), RemoveMulByOne()]).name == "Pipeline[Noop, RemoveMulByOne]"
    assert Pipeline([], name="fixups[X]").name == "fixups[X]"


def test_pipeline_threads_the_graph_through():
    seen = []

    class Replace(Pass):
        def __init__(self, tag):
            self.tag = tag

        def call(self, g):
            seen.append(g)
            return PassResult(g + [self.tag], True)

    result = Pipeline([Replace("a"), Replace("b")])([])
    assert result.modified is True
    assert result.graph == ["a", "b"]
    assert seen == [[], ["a"]]


def test_pipeline_reports_the_failing_inner_pass():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    pipe = Pipeline([Noop(), NeedsRelu()], name="outer")
    with pytest.raises(PreconditionError, match=r"^NeedsRelu: "):
        pipe(gm)
    gm2, _, _ = tiny_graph()
    with pytest.raises(PostconditionError, match=r"^BreaksPostcondition: "):
        Pipeline([Pipeline([RemoveMulByOne(), BreaksPostcondition()])])(gm2)
    with pytest.raises(PostconditionError, match=r"^SneakyAnalysis: "):
        Pipeline([Noop(), SneakyAnalysis()])(tiny_graph()[0])


def test_nested_pipeline_is_a_pass():
    gm, x, ref = tiny_graph()
    inner = Pipeline([RemoveMulByOne()])
    outer = Pipeline([Noop(), inner])
    assert isinstance(inner, Pass) and issubclass(PreconditionError, PassError)
    result = outer(gm)
    assert result.modified is True
    assert [name for name, _, _ in outer.timings] == ["Noop", "Pipeline[RemoveMulByOne]"]
    assert torch.equal(result.graph(x), ref)
