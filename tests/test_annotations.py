"""Typed node annotations: registration, annotate/get, and the encode/decode round trip (ONNX metadata_props)."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Optional

import onnx
import pytest
import torch
from onnx import helper

from adatsq.frontend.layers import LayerRef
from adatsq.passes.annotations import (ENCODING_VERSION, annotate, annotation_types, decode, encode, get_annotation,
                                       iter_annotations, register_annotation)

pytestmark = pytest.mark.usefixtures("seeded")


class Precision(str, enum.Enum):
    W4A8 = "w4a8"
    W8A8 = "w8a8"


@register_annotation("adatsq.test_ann_inner")
@dataclasses.dataclass(frozen=True)
class Inner:
    name: str
    scale: float


@register_annotation("adatsq.test_ann_rich")
@dataclasses.dataclass(frozen=True)
class Rich:
    bits: tuple[int, ...]
    pair: tuple[str, int]
    precision: Precision
    group: Optional[int]
    inner: Inner


RICH = Rich(bits=(4, 8, 8), pair=("k", 3), precision=Precision.W4A8, group=None, inner=Inner("q", 0.5))


def _node():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.relu, (x,))
    g.output(y)
    return y


# --------------------------------------------------------------------------- registration
def test_registry():
    types = annotation_types()
    assert types["adatsq.layer"] is LayerRef and LayerRef.KEY == "adatsq.layer"
    assert types["adatsq.test_ann_rich"] is Rich and Rich.KEY == "adatsq.test_ann_rich"
    # re-registering the same class under its key is harmless
    assert register_annotation("adatsq.test_ann_rich")(Rich) is Rich


def test_register_rejects_bad_declarations():
    with pytest.raises(ValueError, match="must start with 'adatsq.'"):
        register_annotation("fisher")

    @dataclasses.dataclass
    class Mutable:
        x: int

    with pytest.raises(TypeError, match="Mutable: annotations must be frozen dataclasses"):
        register_annotation("adatsq.test_ann_mutable")(Mutable)

    class Plain:
        pass

    with pytest.raises(TypeError, match="frozen dataclasses"):
        register_annotation("adatsq.test_ann_plain")(Plain)

    @dataclasses.dataclass(frozen=True)
    class Impostor:
        param: str

    with pytest.raises(ValueError, match="'adatsq.layer' already registered to LayerRef"):
        register_annotation("adatsq.layer")(Impostor)
    assert annotation_types()["adatsq.layer"] is LayerRef
    assert "adatsq.test_ann_mutable" not in annotation_types()


# --------------------------------------------------------------------------- annotate / get
def test_annotate_and_get():
    node = _node()
    assert get_annotation(node, LayerRef) is None
    ref = LayerRef("blocks.0.attn.to_q.weight", "attn_q", 0, 0)
    annotate(node, ref)
    assert get_annotation(node, LayerRef) is ref
    assert node.meta["adatsq.layer"] is ref
    annotate(node, dataclasses.replace(ref, call_index=1))  # replaces the same kind
    assert get_annotation(node, LayerRef).call_index == 1
    annotate(node, RICH)  # kinds are independent
    assert get_annotation(node, Rich) == RICH and get_annotation(node, LayerRef).call_index == 1


def test_annotate_rejects_unregistered_values():
    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        x: int

    node = _node()
    with pytest.raises(TypeError, match="Unregistered is not a registered annotation type"):
        annotate(node, Unregistered(1))
    with pytest.raises(TypeError, match="not a registered annotation type"):
        get_annotation(node, Unregistered)
    assert not any(k.startswith("adatsq.") for k in node.meta)


def test_get_annotation_rejects_wrong_type_under_key():
    node = _node()
    node.meta["adatsq.layer"] = {"param": "poked directly"}
    with pytest.raises(TypeError, match="adatsq.layer holds dict"):
        get_annotation(node, LayerRef)


def test_iter_annotations_only_yields_registered_values():
    meta = {"val": torch.zeros(1), "stack_trace": "...", "adatsq.layer": LayerRef("a.weight", "other", None, 0),
            "adatsq.test_ann_rich": "not a Rich", "adatsq.unknown": 3}
    assert [k for k, _ in iter_annotations(meta)] == ["adatsq.layer"]


# --------------------------------------------------------------------------- encode / decode
def test_encode_format():
    ref = LayerRef("blocks.0.attn.to_q.weight", "attn_q", None, 0)
    enc = encode({"adatsq.layer": ref, "val": torch.zeros(2), "nn_module_stack": {}})
    assert list(enc) == ["adatsq.layer"]
    payload = json.loads(enc["adatsq.layer"])
    assert payload == {"v": ENCODING_VERSION, "data": {"param": "blocks.0.attn.to_q.weight", "role": "attn_q",
                                                        "block_index": None, "call_index": 0}}
    assert enc["adatsq.layer"] == json.dumps(payload, sort_keys=True), "stable (sorted) encoding"


@pytest.mark.parametrize("value", [LayerRef("x.weight", "attn_q", 3, 1), LayerRef("y.weight", "other", None, 0), RICH,
                                   dataclasses.replace(RICH, group=128, precision=Precision.W8A8, bits=())])
def test_encode_decode_round_trip(value):
    meta = {value.KEY: value, "val": object()}
    back = decode(encode(meta))
    assert back == {value.KEY: value}
    got = back[value.KEY]
    assert type(got) is type(value)
    if isinstance(value, Rich):
        assert isinstance(got.bits, tuple) and isinstance(got.pair, tuple)
        assert got.precision is value.precision and isinstance(got.inner, Inner)


def test_round_trip_through_onnx_node_metadata_props():
    node = helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")
    for k, v in encode({RICH.KEY: RICH, "adatsq.layer": LayerRef("w.weight", "mlp_up", 2, 0)}).items():
        entry = node.metadata_props.add()
        entry.key, entry.value = k, v
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", "['', 'transformer']"
    parsed = onnx.NodeProto.FromString(node.SerializeToString())
    props = {p.key: p.value for p in parsed.metadata_props}
    assert decode(props) == {RICH.KEY: RICH, "adatsq.layer": LayerRef("w.weight", "mlp_up", 2, 0)}


def test_decode_ignores_keys_outside_the_namespace():
    assert decode({"pkg.torch.onnx.name_scopes": "['', 'x']", "namespace": "whatever"}) == {}


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_mis_versioned_payload_is_a_clear_error(version):
    text = json.dumps({"v": version, "data": {"param": "x", "role": "other", "block_index": None, "call_index": 0}})
    with pytest.raises(ValueError, match=r"metadata_props\['adatsq.layer'\] has encoding version .* reads version 1"):
        decode({"adatsq.layer": text})


def test_invalid_json_payload_is_a_clear_error():
    with pytest.raises(ValueError, match=r"metadata_props\['adatsq.layer'\] is not valid JSON"):
        decode({"adatsq.layer": "{truncated"})


def test_unregistered_payload_is_a_clear_error():
    text = json.dumps({"v": ENCODING_VERSION, "data": {"fisher": 0.25}})
    with pytest.raises(ValueError, match="adatsq.fisher"):
        decode({"adatsq.fisher": text})


@pytest.mark.parametrize("text", ["[1, 2]", '{"v": 1}', '{"v": 1, "data": {"param": "x"}}'])
def test_malformed_payload_is_a_clear_error(text):
    with pytest.raises(ValueError, match="adatsq.layer"):
        decode({"adatsq.layer": text})
