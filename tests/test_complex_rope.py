"""LowerComplexToReal: complex RoPE (Z-Image) lowered to real arithmetic, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import adatsq.frontend.export as export_mod
from adatsq.frontend.architectures import ADAPTERS, Resolution
from adatsq.frontend.complex_rope import LowerComplexToReal, complex_nodes
from adatsq.frontend.export import DiTGraph, export_model
from adatsq.passes.infra import PreconditionError, _structure

aten = torch.ops.aten
ZIMAGE = ADAPTERS["ZImageTransformer2DModel"]
COMPLEX_OPS = (aten.view_as_complex.default, aten.view_as_real.default, aten.polar.default)


def _ops(graph: DiTGraph) -> set:
    return {n.target for n in graph.graph.nodes if n.op == "call_function"}


def _eager_zimage(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = ZIMAGE.tiny()
    with torch.no_grad():
        return ZIMAGE.wrap(model, tuple(inputs))(*inputs.values())


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach() - b.detach()).abs().max().item()


@pytest.fixture(scope="module")
def zimage():
    """tiny-zimage exported without fix-ups, its output before lowering, then lowered once."""
    graph = export_model("tiny-zimage", fixups=False)
    with torch.no_grad():
        before = graph(**graph.example_inputs)
    assert complex_nodes(graph.graph), "the un-lowered export is expected to hold complex values"
    linear = [n for n in graph.graph.nodes if n.target is aten.linear.default]
    linear[0].meta["adatsq.layer"] = "kept"  # a preserved annotation key
    linear[0].meta["adatsq.scratch"] = "dropped"  # an annotation key the pass does not preserve
    placeholders = [(n.name, graph.parameter_of(n)) for n in graph.graph.find_nodes(op="placeholder")]
    result = LowerComplexToReal()(graph)
    return dict(graph=graph, result=result, before=before, n_linear=len(linear), placeholders=placeholders,
                annotated=linear[0])


def test_zimage_lowered_exactly(zimage):
    graph = zimage["graph"]
    assert zimage["result"].modified and zimage["result"].graph is graph
    assert complex_nodes(graph.graph) == []
    assert not _ops(graph) & set(COMPLEX_OPS)
    for node in graph.graph.nodes:  # meta was refreshed: every value real, tensor_meta agrees with val
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert not val.is_complex(), node.name
            assert node.meta["tensor_meta"].shape == val.shape, node.name
    with torch.no_grad():
        after = graph(**graph.example_inputs)
    eager = _eager_zimage(graph.example_inputs)
    assert after.shape == zimage["before"].shape == eager.shape
    assert _maxdiff(after, zimage["before"]) <= 1e-5
    assert _maxdiff(after, eager) <= 1e-5


def test_zimage_interface_and_annotations_kept(zimage):
    graph = zimage["graph"]
    # not re-traced: same placeholders mapping to the same transformer parameters, linears intact
    assert [(n.name, graph.parameter_of(n)) for n in graph.graph.find_nodes(op="placeholder")] == \
        zimage["placeholders"]
    assert sum(n.target is aten.linear.default for n in graph.graph.nodes) == zimage["n_linear"]
    assert zimage["annotated"].meta.get("adatsq.layer") == "kept"
    assert "adatsq.scratch" not in zimage["annotated"].meta


def test_second_run_is_a_noop(zimage):
    graph = zimage["graph"]
    before = _structure(graph)
    assert LowerComplexToReal()(graph).modified is False
    assert _structure(graph) == before


def test_lowered_zimage_exports_to_onnx(zimage, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    graph = zimage["graph"]
    path = tmp_path / "zimage.onnx"
    torch.onnx.export(graph.program, tuple(graph.example_inputs.values()), str(path), dynamo=True,
                      opset_version=21)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: v.numpy() for i, v in zip(session.get_inputs(), graph.example_inputs.values())}
    (onnx_out,) = session.run(None, feeds)
    with torch.no_grad():
        ref = graph(**graph.example_inputs).numpy()
    rel = np.abs(onnx_out - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4


def test_export_model_runs_the_fixup():
    graph = export_model("tiny-zimage")
    assert complex_nodes(graph.graph) == []
    with torch.no_grad():
        assert _maxdiff(graph(**graph.example_inputs), _eager_zimage(graph.example_inputs)) <= 1e-5


def test_cached_rope_table_lifted_as_constants(monkeypatch):
    """A RoPE cache filled before export is lifted as complex constants: converted to real views."""
    model = ZIMAGE.tiny()
    inputs = ZIMAGE.example_inputs(model, ZIMAGE.default_resolution)
    with torch.no_grad():
        eager = ZIMAGE.wrap(model, tuple(inputs))(*inputs.values())  # fills rope_embedder.freqs_cis
    monkeypatch.setattr(export_mod, "_reset_caches", lambda model: None)
    graph = export_model(model, fixups=False)
    assert any(v.is_complex() for v in graph.program.constants.values())
    assert LowerComplexToReal()(graph).modified
    assert not any(v.is_complex() for v in graph.program.constants.values())
    assert complex_nodes(graph.graph) == []
    with torch.no_grad():
        assert _maxdiff(graph(**graph.example_inputs), eager) <= 1e-5


# --------------------------------------------------------------------------- hand-built modules
class TinyComplexRope(nn.Module):
    """Complex RoPE plus most lowering rules: complex buffers (persistent and not), index, polar,
    where, complex*complex, complex and real scalars, conj, add/sub, slice, pad, div, cat,
    transpose, expand, complex zeros, view_as_real."""

    def __init__(self, dim: int = 8, heads: int = 2, max_len: int = 32):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.proj = nn.Linear(dim * heads, dim * heads)
        freqs = 1.0 / (100.0 ** (torch.arange(0, dim, 2).float() / dim))
        angles = torch.outer(torch.arange(max_len).float(), freqs)
        self.register_buffer("table", torch.polar(torch.ones_like(angles), angles), persistent=False)
        self.register_buffer("scale", torch.polar(torch.full((dim // 2,), 0.9), torch.linspace(0, 1, dim // 2)))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.proj(x).view(b, n, self.heads, self.dim)
        angles = pos.float()[:, None] * torch.linspace(0.1, 1.0, self.dim // 2)
        cis = torch.where((pos % 2 == 0)[:, None], self.table[pos], torch.polar(torch.ones_like(angles), angles))
        cis = cis * self.scale
        z = torch.view_as_complex(q.float().reshape(b, n, self.heads, -1, 2)) * cis[None, :, None, :]
        z = z * (0.5 - 0.25j) + z.conj() * 2.0 - 1.0 + (1 + 2j)
        z = torch.cat([z, F.pad(z[..., :1], (0, 1)) / 3.0], dim=-1)
        z = z.transpose(1, 2).expand(b, self.heads, n, self.dim // 2 + 2)
        z = z + torch.zeros(b, self.heads, n, self.dim // 2 + 2, dtype=torch.complex64)
        return torch.view_as_real(z).flatten(3)


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], dynamic_shapes=None) -> DiTGraph:
    program = torch.export.export(module, tuple(inputs.values()), dynamic_shapes=dynamic_shapes, strict=False)
    program = program.run_decompositions(export_mod._decomposition_table())
    return DiTGraph(program, ZIMAGE, {}, Resolution(), dict(inputs), dynamic_shapes is not None)


def _tiny_rope_graph() -> tuple[TinyComplexRope, DiTGraph]:
    torch.manual_seed(0)
    module = TinyComplexRope().eval()
    inputs = dict(x=torch.randn(2, 10, 16), pos=torch.arange(10) * 3 % 32)
    n = Dim("n", min=2, max=32)
    return module, _export(module, inputs, dynamic_shapes=({1: n}, {0: n}))


def test_hand_built_complex_rope_module(tmp_path):
    module, graph = _tiny_rope_graph()
    args = tuple(graph.example_inputs.values())
    other = (torch.randn(2, 17, 16), torch.arange(17) * 5 % 32)  # another token count (dynamic)
    with torch.no_grad():
        before = [graph.module()(*a) for a in (args, other)]
        eager = [module(*a) for a in (args, other)]
    assert complex_nodes(graph.graph)
    assert LowerComplexToReal()(graph).modified
    assert complex_nodes(graph.graph) == [] and not _ops(graph) & set(COMPLEX_OPS)
    assert not any(v.is_complex() for v in [*graph.program.state_dict.values(), *graph.program.constants.values()])
    x_val = next(iter(graph.graph.find_nodes(op="placeholder", target="x"))).meta["val"]
    assert isinstance(x_val.shape[1], torch.SymInt)  # meta refresh kept the token dim dynamic
    with torch.no_grad():
        after = [graph.module()(*a) for a in (args, other)]
    for a, b, e in zip(after, before, eager):
        assert _maxdiff(a, b) <= 1e-5
        assert _maxdiff(a, e) <= 1e-5
    assert LowerComplexToReal()(graph).modified is False

    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "rope.onnx"
    torch.onnx.export(graph.program, args, str(path), dynamo=True, opset_version=21)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for a, ref in zip((args, other), after):
        (out,) = session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), a)})
        assert np.abs(out - ref.numpy()).max() / np.abs(ref.numpy()).max() <= 1e-4


def _z(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(x.reshape(2, 6, 4, 2))


def _r(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(2, 6, 4, 2)[..., 0]


def _setitem(x: torch.Tensor) -> torch.Tensor:
    z = _z(x).clone()
    z[:, 0] = z[:, 1] * 2
    z[:, 1:3] = 0
    return z


#: small complex programs, one or a few rules each (input: real x of shape [2, 6, 8]).
OP_CASES = {
    "flip-roll": lambda x: torch.roll(torch.flip(_z(x), [-1, 0]), 1, -2),
    "split-stack": lambda x: torch.stack(_z(x).split([1, 3], -1)[::-1][1:] * 2, -1),
    "unbind": lambda x: torch.stack(_z(x).unbind(-1)[::-1], 0),
    "layout": lambda x: _z(x).unsqueeze(-1).permute(3, 0, 2, 1).repeat(2, 1, 1, 1)[None].squeeze(0).transpose(0, -1),
    "expand-reshape": lambda x: _z(x)[:, :, None].expand(2, 6, 3, 4).reshape(2, 18, 4),
    "select-index": lambda x: _z(x).index_select(-1, torch.tensor([3, 0])) * _z(x).select(-1, 1)[..., None],
    "add-sub-alpha": lambda x: torch.sub(torch.add(_z(x), _z(x).flip(-1), alpha=2), 3.0, alpha=2) - (1 - 2j),
    "real-tensor-promotion": lambda x: _r(x) * (1 + 2j) + _z(x) + _r(x),
    "where-real": lambda x: torch.where(_r(x) > 0, _z(x), _r(x)),
    "cat-real": lambda x: torch.cat([_z(x), _r(x)], -1),
    "pad": lambda x: F.pad(_z(x), (1, 2))[..., 1:5] + torch.constant_pad_nd(_z(x), [0, 0, 1, 0], 1.5)[:, 1:],
    "full-like": lambda x: torch.full_like(_z(x), 1 + 2j) + _z(x) * torch.zeros_like(_z(x)) + torch.ones_like(_z(x)),
    "to-copy": lambda x: _z(x).to(torch.complex128).to(torch.complex64) * _r(x).to(torch.complex64),
    "real-imag": lambda x: torch.cat([_z(x).real, _z(x).imag], -1).to(torch.complex64),
    "setitem": _setitem,
    "complex-ctor": lambda x: torch.complex(_r(x), _r(x) + 1) * _z(x),
    "conj": lambda x: _z(x).conj() * _z(x) + _z(x).conj_physical(),
    "div-real": lambda x: _z(x) / (_r(x).abs() + 1) / 2.0,
}


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.fn(x))


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_rules_are_exact(case):
    module = _Fn(OP_CASES[case])
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    graph = _export(module, dict(x=x))
    assert complex_nodes(graph.graph)
    assert LowerComplexToReal()(graph).modified
    assert complex_nodes(graph.graph) == []
    with torch.no_grad():
        assert _maxdiff(graph.module()(x), module(x)) <= 1e-6


class _ComplexExp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(torch.exp(z)).flatten(-2)


class _ComplexOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * 2.0


class _ComplexInput(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(z * z)


@pytest.mark.parametrize("module, inputs, message", [
    (_ComplexExp(), dict(x=torch.randn(3, 8)), "aten.exp.default"),
    (_ComplexOutput(), dict(x=torch.randn(3, 8)), "complex graph output"),
    (_ComplexInput(), dict(z=torch.randn(3, 4, dtype=torch.complex64)), "complex user_input z"),
], ids=["unsupported-op", "complex-output", "complex-input"])
def test_unsupported_graphs_are_refused_untouched(module, inputs, message):
    graph = _export(module, inputs)
    before = _structure(graph)
    with pytest.raises(PreconditionError, match="LowerComplexToReal") as info:
        LowerComplexToReal()(graph)
    assert message in str(info.value)
    assert _structure(graph) == before  # refused before any rewrite
