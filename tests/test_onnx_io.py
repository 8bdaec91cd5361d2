"""ONNX export (onnxruntime numerics, dynamic dims, metadata) and ONNX import into the layer table."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from adatsq.errors import ExportError, InputError
from adatsq.frontend.layers import LayerRef, LayerTable
from adatsq.frontend.onnx_io import export_onnx, layer_table_from_onnx, load_onnx, model_metadata
from adatsq.passes.annotations import decode

pytestmark = pytest.mark.usefixtures("seeded")


def _rel(out: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.double().numpy()
    assert out.shape == ref.shape, f"shape {out.shape} != {ref.shape}"
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def _props(node) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _with_value(props, key: str, value: str) -> None:
    for p in props:
        if p.key == key:
            p.value = value
            return
    raise KeyError(key)


# --------------------------------------------------------------------------- numerics
def test_onnx_matches_torch(artifacts, tiny_arch, record_property):
    out = artifacts.run_onnx(tiny_arch, artifacts.inputs(tiny_arch))
    ref = artifacts.eager(tiny_arch)
    rel = _rel(out, ref)
    record_property(f"adatsq:{tiny_arch} onnxruntime vs eager rel err", rel)
    assert rel <= artifacts.ONNX_RTOL, f"{tiny_arch}: onnxruntime differs from torch by {rel:.3e} (relative)"
    # and against the exported program it was made from
    assert _rel(out, artifacts.graph(tiny_arch)(*artifacts.inputs(tiny_arch).values())) <= artifacts.ONNX_RTOL


def test_onnx_is_dynamic_at_second_resolution(artifacts, dynamic_arch, record_property):
    tiny_arch = dynamic_arch
    res2 = artifacts.SECOND_RESOLUTION[tiny_arch]
    ref = artifacts.eager(tiny_arch, res2, seed=1)
    out = artifacts.run_onnx(tiny_arch, artifacts.inputs(tiny_arch, res2, seed=1))
    assert out.shape[0] == res2.batch
    rel = _rel(out, ref)
    at = f"@{res2.batch}x{res2.frames}x{res2.height}x{res2.width}/t{res2.text_len}"
    record_property(f"adatsq:{tiny_arch} onnxruntime vs eager {at}", rel)
    assert rel <= artifacts.ONNX_RTOL


def test_onnx_input_dims(artifacts, tiny_arch):
    model = artifacts.onnx_model(tiny_arch)
    inputs = artifacts.inputs(tiny_arch)
    graph_inputs = {i.name: i for i in model.graph.input}
    assert list(graph_inputs) == list(inputs)
    assert [o.name for o in model.graph.output] == ["sample"]
    for name, expected in artifacts.DYNAMIC_DIMS[tiny_arch].items():
        dims = graph_inputs[name].type.tensor_type.shape.dim
        assert len(dims) == inputs[name].dim()
        symbolic = {k for k, d in enumerate(dims) if d.HasField("dim_param")}
        assert symbolic == expected, f"{tiny_arch}.{name}: symbolic {symbolic}, expected {expected}"
        for k, d in enumerate(dims):
            if k not in expected:
                assert d.dim_value == inputs[name].shape[k]


def test_zimage_onnx_rejects_other_batch(artifacts):
    res3 = dataclasses.replace(artifacts.adapter("tiny-zimage").default_resolution, batch=3)
    with pytest.raises(Exception, match=r"(?i)dimension|shape|index"):
        artifacts.run_onnx("tiny-zimage", artifacts.inputs("tiny-zimage", res3, seed=1))


# --------------------------------------------------------------------------- layer table from ONNX
def test_onnx_layer_table_equals_torch_table(artifacts, tiny_arch):
    torch_table = artifacts.table(tiny_arch)
    onnx_table = layer_table_from_onnx(artifacts.onnx_path(tiny_arch))
    assert onnx_table.source == "onnx" and onnx_table.arch == torch_table.arch
    assert onnx_table.same_layers(torch_table) == []
    assert onnx_table.names == torch_table.names
    onnx_table.check_covers(artifacts.model(tiny_arch))
    node_names = {n.name: n.op_type for n in artifacts.onnx_model(tiny_arch).graph.node}
    for info in onnx_table:
        assert info.onnx_nodes, info.param
        ops = {node_names[n] for n in info.onnx_nodes}
        assert ops == {"Conv"} if info.kind == "conv" else ops <= {"MatMul", "Gemm"}, (info.param, ops)
        assert 1 <= info.calls <= torch_table[info.param].calls
    # LayerTable.from_onnx on a ModelProto is the same
    assert LayerTable.from_onnx(artifacts.onnx_model(tiny_arch)).same_layers(torch_table) == []


def test_onnx_nodes_carry_layer_annotations(artifacts, tiny_arch):
    table = artifacts.table(tiny_arch)
    seen = {}
    for node in artifacts.onnx_model(tiny_arch).graph.node:
        ann = decode(_props(node)).get(LayerRef.KEY)
        if ann is None or node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        assert isinstance(ann, LayerRef)
        info = table[ann.param]
        assert (ann.role, ann.block_index) == (info.role, info.block_index)
        assert 0 <= ann.call_index < info.calls
        seen.setdefault(ann.param, set()).add(ann.call_index)
    assert set(seen) == set(table.names), "every layer has an annotated ONNX node"


def test_model_metadata(artifacts, tiny_arch):
    model = artifacts.onnx_model(tiny_arch)
    meta = model_metadata(model)
    res = artifacts.adapter(tiny_arch).default_resolution
    assert meta["arch"] == artifacts.adapter(tiny_arch).arch
    assert meta["resolution"] == dataclasses.asdict(res)
    assert meta["inputs"] == {k: list(v.shape) for k, v in artifacts.inputs(tiny_arch).items()}
    for key, value in artifacts.adapter(tiny_arch).tiny_config.items():
        assert meta["config"][key] == (list(value) if isinstance(value, tuple) else value), key
    (layers,) = [p.value for p in model.metadata_props if p.key == "adatsq.layers"]
    assert LayerTable.from_json(json.loads(layers)).same_layers(artifacts.table(tiny_arch)) == []


def test_foreign_onnx_without_adatsq_metadata(artifacts):
    """A model stripped of our metadata still maps its layers to parameter names (exporter scopes)."""
    model = copy.deepcopy(artifacts.onnx_model("tiny-dit"))
    del model.metadata_props[:]
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if not p.key.startswith("adatsq.")]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    assert model_metadata(model) == {}
    table = layer_table_from_onnx(model)
    assert table.arch == "unknown"
    assert table.names == artifacts.table("tiny-dit").names
    assert table.same_layers(artifacts.table("tiny-dit")) == []
    assert all(i.tokens is None for i in table)


def test_onnx_graph_disagreeing_with_its_metadata_is_input_error(artifacts):
    model = copy.deepcopy(artifacts.onnx_model("tiny-dit"))
    data = json.loads(next(p.value for p in model.metadata_props if p.key == "adatsq.layers"))
    data["layers"][3]["shape"] = [1, 1]
    _with_value(model.metadata_props, "adatsq.layers", json.dumps(data))
    with pytest.raises(InputError, match=f"disagrees.*{data['layers'][3]['param']}.*shape"):
        layer_table_from_onnx(model)
    data["version"] = 99
    _with_value(model.metadata_props, "adatsq.layers", json.dumps(data))
    with pytest.raises(InputError, match="unknown layer-table version 99"):
        layer_table_from_onnx(model)


def test_bad_node_annotation_is_input_error(artifacts):
    model = copy.deepcopy(artifacts.onnx_model("tiny-dit"))
    node = next(n for n in model.graph.node if LayerRef.KEY in _props(n) and n.op_type in ("MatMul", "Gemm"))
    _with_value(node.metadata_props, LayerRef.KEY, json.dumps({"v": 7, "data": {}}))
    with pytest.raises(InputError, match="version 7"):
        layer_table_from_onnx(model)


# --------------------------------------------------------------------------- files
def test_truncated_onnx_is_input_error(artifacts, tmp_path):
    data = artifacts.onnx_path("tiny-dit").read_bytes()
    for frac in (0.5, 0.9, 0.999):
        path = tmp_path / f"cut{frac}.onnx"
        path.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(InputError, match=str(path)):
            load_onnx(path)
        with pytest.raises(InputError, match=str(path)):
            layer_table_from_onnx(path)


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "folder"])
def test_unreadable_onnx_is_input_error(tmp_path, case):
    path = tmp_path / "model.onnx"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"this is not a protobuf \xff\xfe" * 50)
    elif case == "folder":
        path.mkdir()
    with pytest.raises(InputError, match=str(path)):
        load_onnx(path)


def test_load_onnx_round_trip(artifacts):
    model = load_onnx(artifacts.onnx_path("tiny-sd3"))
    assert model_metadata(model)["arch"] == "SD3Transformer2DModel"
    assert len(model.graph.node) == len(artifacts.onnx_model("tiny-sd3").graph.node)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21


def test_old_opset_is_refused(artifacts, tmp_path):
    path = tmp_path / "old.onnx"
    with pytest.raises(InputError, match="opset 20"):
        export_onnx(artifacts.graph("tiny-dit"), path, opset=20)
    assert not path.exists()


def test_failed_onnx_export_is_atomic(artifacts, tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous artefact")

    def boom(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(ExportError, match="DiTTransformer2DModel.*converter exploded"):
        export_onnx(artifacts.graph("tiny-dit"), path)
    assert path.read_bytes() == b"previous artefact"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "no temporary files left"
