"""torch.export of the six tiny DiTs: numerics vs eager, dynamic dimensions, input validation, fix-ups."""

from __future__ import annotations

import collections
import dataclasses
import re

import pytest
import torch
from torch import nn

from adatsq.errors import AdatsqError, ExportError, InputError, UnsupportedArchitectureError
from adatsq.frontend.architectures import BUILTINS, Resolution
from adatsq.frontend.export import KEEP_OPS, DiTGraph, _decomposition_table, export_model
from adatsq.frontend.fixups import COMMON_FIXUPS, CanonicalizeEmptyPermuted, RemoveNoopSqueeze, fixup_pipeline
from adatsq.frontend.layers import LayerRef
from adatsq.frontend.onnx_io import export_onnx
from adatsq.passes.annotations import annotate, get_annotation

pytestmark = pytest.mark.usefixtures("seeded")

aten = torch.ops.aten
SQUEEZES = (aten.squeeze.dim, aten.squeeze.dims)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def _op_counts(graph: DiTGraph) -> collections.Counter:
    return collections.Counter(n.target for n in graph.graph.nodes if n.op == "call_function")


def _user_input_shapes(graph: DiTGraph) -> dict[str, tuple]:
    sig = graph.program.graph_signature
    placeholders = {n.name: n for n in graph.graph.nodes if n.op == "placeholder"}
    return {name: tuple(placeholders[p].meta["val"].shape) for name, p in zip(graph.input_names, sig.user_inputs)}


# --------------------------------------------------------------------------- export, per architecture
def test_export_produces_aten_program(artifacts, tiny_arch):
    graph = artifacts.graph(tiny_arch)
    adapter = BUILTINS[tiny_arch]
    assert isinstance(graph.program, torch.export.ExportedProgram)
    assert graph.arch == adapter.arch and graph.adapter is adapter
    assert graph.resolution == adapter.default_resolution
    assert graph.dynamic is (tiny_arch in artifacts.DYNAMIC_ARCHS)
    assert graph.input_names == tuple(artifacts.inputs(tiny_arch))
    counts = _op_counts(graph)
    # the quantizable ops and attention survive run_decompositions as single nodes
    assert counts[aten.linear.default] > 0
    assert counts[aten.scaled_dot_product_attention.default] > 0
    matmuls = (aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default)
    decomposed = [n.name for n in graph.graph.nodes if n.target in matmuls
                  and any(a.op == "placeholder" and graph.parameter_of(a) for a in n.all_input_nodes)]
    assert decomposed == [], f"linear layers were decomposed: {decomposed}"
    assert {"linear.default", "scaled_dot_product_attention.default"} <= set(KEEP_OPS)
    # no complex values are left for ONNX (Z-Image's RoPE is lowered to real arithmetic)
    complex_nodes = [n.name for n in graph.graph.nodes
                     if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()]
    assert complex_nodes == [], f"complex values left in the graph: {complex_nodes[:5]}"


def test_export_matches_eager(artifacts, tiny_arch, record_property):
    graph = artifacts.graph(tiny_arch)
    inputs = artifacts.inputs(tiny_arch)
    # the graph's own example inputs are the adapter's, for the same seed
    assert all(torch.equal(inputs[k], v) for k, v in graph.example_inputs.items())
    ref = artifacts.eager(tiny_arch)
    out = graph(*inputs.values())
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    diff = _max_abs(out, ref)
    record_property(f"adatsq:{tiny_arch} export vs eager max abs diff", diff)
    assert diff <= artifacts.EXPORT_ATOL, f"{tiny_arch}: exported graph differs from eager by {diff:.3e}"
    # keyword call is the same as positional
    assert torch.equal(graph(**inputs), out)


def test_export_is_deterministic_for_a_seed(artifacts):
    # a second export of the same builtin and seed gives bit-identical results
    again = export_model("tiny-dit")
    inputs = artifacts.inputs("tiny-dit")
    assert torch.equal(again(*inputs.values()), artifacts.graph("tiny-dit")(*inputs.values()))


def test_exported_dims_are_symbolic_where_declared(artifacts, tiny_arch):
    shapes = _user_input_shapes(artifacts.graph(tiny_arch))
    expected = artifacts.DYNAMIC_DIMS[tiny_arch]
    assert set(shapes) == set(expected)
    for name, shape in shapes.items():
        symbolic = {d for d, s in enumerate(shape) if not isinstance(s, int)}
        assert symbolic == expected[name], f"{tiny_arch}.{name}: symbolic dims {symbolic}, expected {expected[name]}"


def test_export_is_dynamic_at_second_resolution(artifacts, dynamic_arch, record_property):
    tiny_arch = dynamic_arch
    res2 = artifacts.SECOND_RESOLUTION[tiny_arch]
    default = BUILTINS[tiny_arch].default_resolution
    assert res2.batch != default.batch
    inputs = artifacts.inputs(tiny_arch, res2, seed=1)
    ref = artifacts.eager(tiny_arch, res2, seed=1)
    assert ref.shape[0] == res2.batch
    assert ref.shape != artifacts.eager(tiny_arch).shape
    out = artifacts.graph(tiny_arch)(*inputs.values())
    diff = _max_abs(out, ref)
    at = f"@{res2.batch}x{res2.frames}x{res2.height}x{res2.width}/t{res2.text_len}"
    record_property(f"adatsq:{tiny_arch} export vs eager {at}", diff)
    assert diff <= artifacts.EXPORT_ATOL


def test_zimage_export_is_static(artifacts):
    graph = artifacts.graph("tiny-zimage")
    assert graph.dynamic is False
    res3 = dataclasses.replace(graph.resolution, batch=3)
    inputs = artifacts.inputs("tiny-zimage", res3, seed=1)
    with pytest.raises(Exception, match=r"(?i)guard|size|shape|expected"):
        graph(*inputs.values())


def test_dynamic_false_gives_static_program(artifacts):
    graph = export_model("tiny-dit", dynamic=False)
    assert graph.dynamic is False
    for name, shape in _user_input_shapes(graph).items():
        assert all(isinstance(s, int) for s in shape), f"{name}: {shape}"
    inputs = artifacts.inputs("tiny-dit")
    assert _max_abs(graph(*inputs.values()), artifacts.eager("tiny-dit")) <= artifacts.EXPORT_ATOL
    other = artifacts.inputs("tiny-dit", artifacts.SECOND_RESOLUTION["tiny-dit"], seed=1)
    with pytest.raises(Exception, match=r"(?i)guard|size|shape|expected"):
        graph(*other.values())


def test_export_of_model_instance_uses_its_weights(artifacts):
    model = BUILTINS["tiny-dit"].tiny(seed=7)
    graph = export_model(model)
    inputs = artifacts.inputs("tiny-dit")
    wrapped = BUILTINS["tiny-dit"].wrap(model, tuple(inputs))
    ref = wrapped(*inputs.values())
    assert _max_abs(graph(*inputs.values()), ref) <= 1e-5
    # and they are not the seed-0 weights
    assert _max_abs(ref, artifacts.eager("tiny-dit")) > 1e-3


# --------------------------------------------------------------------------- input validation
BAD_RESOLUTIONS = [
    ("tiny-flux", Resolution(15, 16, 8), ["FluxTransformer2DModel", "height 15", "patch size 2"]),
    ("tiny-flux", Resolution(16, 7, 8), ["FluxTransformer2DModel", "width 7", "patch size 2"]),
    ("tiny-sd3", Resolution(16, 9, 8), ["SD3Transformer2DModel", "width 9", "patch size 2"]),
    ("tiny-sd3", Resolution(34, 16, 8), ["SD3Transformer2DModel", "34x16", "pos_embed_max_size"]),
    ("tiny-pixart", Resolution(16, 13, 8), ["PixArtTransformer2DModel", "width 13", "patch size 2"]),
    ("tiny-dit", Resolution(5, 16, 1), ["DiTTransformer2DModel", "height 5", "patch size 2"]),
    ("tiny-wan", Resolution(13, 16, 8, frames=3), ["WanTransformer3DModel", "height 13", "patch size 2"]),
    ("tiny-zimage", Resolution(16, 11, 8), ["ZImageTransformer2DModel", "width 11", "patch size 2"]),
]


@pytest.mark.parametrize("name,res,words", BAD_RESOLUTIONS,
                         ids=[f"{n}-{r.height}x{r.width}" for n, r, _ in BAD_RESOLUTIONS])
def test_resolution_not_fitting_patch_size_is_input_error(name, res, words):
    with pytest.raises(InputError) as info:
        export_model(name, res)
    assert not isinstance(info.value, ExportError)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("field,value", [("height", 0), ("width", -2), ("text_len", 2.5), ("batch", True)])
def test_resolution_rejects_non_positive_ints(field, value):
    with pytest.raises(InputError, match=f"{field} must be a positive integer"):
        Resolution(**{field: value})


class HunyuanDiT2DModel(nn.Module):  # a real diffusers DiT class name that has no adapter
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


def test_unsupported_model_class_is_rejected():
    with pytest.raises(UnsupportedArchitectureError) as info:
        export_model(HunyuanDiT2DModel())
    msg = str(info.value)
    assert "HunyuanDiT2DModel" in msg
    assert all(a.arch in msg for a in BUILTINS.values()), "message lists the supported classes"
    assert isinstance(info.value, InputError) and isinstance(info.value, AdatsqError)


def test_non_model_and_unknown_builtin_are_rejected(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="int"):
        export_model(42)
    with pytest.raises(InputError, match="tiny-nope.*not a builtin") as info:
        export_model("tiny-nope")
    assert all(b in str(info.value) for b in BUILTINS)
    missing = tmp_path / "missing"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        export_model(missing)


def test_torch_export_failure_is_export_error(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom: data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", boom)
    with pytest.raises(ExportError) as info:
        export_model("tiny-dit")
    msg = str(info.value)
    assert "DiTTransformer2DModel" in msg and "boom" in msg and "RuntimeError" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


# --------------------------------------------------------------------------- fix-ups on tiny graphs
def _tiny_graph(module: nn.Module, *inputs: torch.Tensor) -> DiTGraph:
    ep = torch.export.export(module, inputs, strict=False).run_decompositions(_decomposition_table())
    return DiTGraph(ep, BUILTINS["tiny-pixart"], {}, Resolution(), {f"in{i}": t for i, t in enumerate(inputs)},
                    dynamic=False)


class _Squeezes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):  # x: [2, 4, 3]
        noop = self.lin(x).squeeze(1)  # dim 1 has size 4: a no-op in torch
        real = x[:, :1].squeeze(1)  # dim 1 has size 1: a real squeeze
        return noop + real[:, None]


def test_remove_noop_squeeze_on_tiny_graph():
    torch.manual_seed(0)
    module, x = _Squeezes().eval(), torch.randn(2, 4, 3)
    ref = module(x)
    graph = _tiny_graph(module, x)
    assert _op_counts(graph)[aten.squeeze.dims] + _op_counts(graph)[aten.squeeze.dim] == 2
    lin = next(n for n in graph.graph.nodes if n.target is aten.linear.default)
    annotate(lin, LayerRef("lin.weight", "other", None, 0))

    result = RemoveNoopSqueeze()(graph)

    assert result.modified is True
    counts = _op_counts(result.graph)
    assert counts[aten.squeeze.dims] + counts[aten.squeeze.dim] == 1
    (kept,) = [n for n in result.graph.graph.nodes if n.target in SQUEEZES]
    assert kept.args[0].meta["val"].shape[1] == 1, "the real squeeze must stay"
    assert get_annotation(lin, LayerRef) == LayerRef("lin.weight", "other", None, 0), "adatsq.layer is preserved"
    assert _max_abs(result.graph(x), ref) == 0.0
    # idempotent
    assert RemoveNoopSqueeze()(result.graph).modified is False


def test_remove_noop_squeeze_leaves_real_squeezes_alone():
    class RealOnly(nn.Module):
        def forward(self, x):
            return x.squeeze(1) * 2

    x = torch.randn(2, 1, 3)
    graph = _tiny_graph(RealOnly(), x)
    before = _op_counts(graph)
    result = RemoveNoopSqueeze()(graph)
    assert result.modified is False
    assert _op_counts(result.graph) == before
    assert torch.equal(result.graph(x), x.squeeze(1) * 2)


def test_canonicalize_empty_permuted_on_tiny_graph():
    class EmptyLike(nn.Module):
        def forward(self, x):
            buf = torch.empty_like(x)
            buf.copy_(x * 3)
            return buf + 1

    x = torch.randn(2, 4, 3)
    graph = _tiny_graph(EmptyLike(), x)
    assert _op_counts(graph)[aten.empty_permuted.default] == 1
    result = CanonicalizeEmptyPermuted()(graph)
    assert result.modified is True
    counts = _op_counts(result.graph)
    assert counts[aten.empty_permuted.default] == 0 and counts[aten.empty.memory_format] == 1
    assert _max_abs(result.graph(x), x * 3 + 1) == 0.0
    assert CanonicalizeEmptyPermuted()(result.graph).modified is False


def test_fixup_pipelines_per_architecture():
    names = {a: [p.name for p in fixup_pipeline(BUILTINS[a]).passes] for a in BUILTINS}
    for a, adapter in BUILTINS.items():
        assert names[a] == list(COMMON_FIXUPS) + list(adapter.fixups)
        assert "CanonicalizeEmptyPermuted" in names[a]
    assert names["tiny-pixart"][-1] == "RemoveNoopSqueeze"
    assert "LowerComplexToReal" in names["tiny-zimage"]
    assert "RemoveNoopSqueeze" not in names["tiny-flux"] + names["tiny-wan"]


# --------------------------------------------------------------------------- fix-ups are needed
def _failure_of(graph: DiTGraph, path) -> str | None:
    """Why ``graph`` cannot be run by onnxruntime (export or load failure), or None if it can."""
    import onnxruntime as ort

    try:
        export_onnx(graph, path)
    except ExportError as exc:
        assert not path.exists(), "a failed export must not leave a file behind"
        texts, e = [], exc
        while e is not None:
            texts.append(str(e))
            e = e.__cause__
        return "export: " + "\n".join(texts)
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph
        return f"onnxruntime: {exc}"
    return None


def test_pixart_onnx_needs_remove_noop_squeeze(artifacts, tmp_path):
    raw = export_model("tiny-pixart", fixups=False)
    noop = [n for n in raw.graph.nodes if n.target in SQUEEZES and all(
        n.args[0].meta["val"].shape[d] != 1 for d in ([n.args[1]] if isinstance(n.args[1], int) else n.args[1]))]
    assert len(noop) == 1, "PixArt's hidden_states.squeeze(1) on a non-1 dimension"

    failure = _failure_of(raw, tmp_path / "pixart_raw.onnx")
    assert failure is not None, "PixArt without RemoveNoopSqueeze unexpectedly runs in onnxruntime"
    assert re.search(r"squeeze|view_of", failure, re.I), failure

    fixed = RemoveNoopSqueeze()(raw)
    assert fixed.modified is True
    assert not [n for n in fixed.graph.graph.nodes if n.target in SQUEEZES]
    inputs = artifacts.inputs("tiny-pixart")
    assert _max_abs(fixed.graph(*inputs.values()), artifacts.eager("tiny-pixart")) <= artifacts.EXPORT_ATOL
    # the default export (fix-ups on) is the one that loads
    assert artifacts.session("tiny-pixart") is not None


def test_wan_onnx_needs_canonicalize_empty_permuted(artifacts, tmp_path):
    raw = export_model("tiny-wan", fixups=False)
    n_empty = _op_counts(raw)[aten.empty_permuted.default]
    assert n_empty > 0
    failure = _failure_of(raw, tmp_path / "wan_raw.onnx")
    assert failure is not None and "empty_permuted" in failure, failure

    fixed = artifacts.graph("tiny-wan")
    counts = _op_counts(fixed)
    assert counts[aten.empty_permuted.default] == 0
    assert counts[aten.empty.memory_format] == n_empty
    assert artifacts.session("tiny-wan") is not None
