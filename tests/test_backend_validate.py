"""The TensorRT explicit-quantization validator (backends/validate.py).

Valid graphs (INT8 W8A8 per-channel, INT4 blocked weight-only, FP8 W8A8) pass ``onnx.checker``,
run in onnxruntime and match a numpy reference (so they are real Q/DQ graphs, not shapes that only
the validator likes), and have no violations. Then one broken graph per rule, each reporting that
rule's id.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adatsq.backends.validate import RULES, Violation, check_files, check_model, main
from adatsq.errors import InputError

K, N, BLOCK = 32, 16, 16
RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, K)).astype(np.float32)
W = (RNG.standard_normal((K, N)) * 0.1).astype(np.float32)


# ----------------------------------------------------------------------------- graph builders
def _t(name, arr, dtype=None):
    """An initializer from a numpy array (int4 / fp8 through ml_dtypes)."""
    arr = np.asarray(arr)
    if dtype is not None:
        return helper.make_tensor(name, dtype, arr.shape, arr.flatten().tolist())
    return numpy_helper.from_array(arr, name)


def _model(nodes, inits, *, inputs=None, outputs=None, opset=21, x_shape=("B", K)):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape[:-1]) + [None])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _act_qdq(qtype=TensorProto.INT8, scale=0.05, name="x", out="xd", zero=0.0):
    """Q->DQ on activation ``name`` (per-tensor)."""
    return ([helper.make_node("QuantizeLinear", [name, "sx", "zx"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], [out], name="dq_x")],
            [_t("sx", np.float32(scale)), _t("zx", np.array(zero), qtype)])


def int8_weight(w=W):
    s = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # per output channel (axis 1 of [K, N])
    q = np.clip(np.rint(w / s), -127, 127).astype(np.int8)
    return q, s


def w8a8_model(opset=21):
    q, s = int8_weight()
    act, act_inits = _act_qdq()
    nodes = act + [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=1),
                   helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    nodes[-1].metadata_props.add(key="adatsq.layer", value='{"v": 1, "name": "blocks.0.attn.to_q"}')
    inits = act_inits + [_t("w", q), _t("sw", s), _t("zw", np.zeros(N, np.int8))]
    return _model(nodes, inits, opset=opset), (q, s)


def w8a8_reference(x, q, s, sx=0.05):
    xq = np.clip(np.rint(x / sx), -128, 127) * sx
    return xq @ (q.astype(np.float32) * s)


def int4_weight(w=W, block=BLOCK):
    """Blocks of ``block`` along K (axis 0 of [K, N]): scale [K/block, N]."""
    wb = w.reshape(w.shape[0] // block, block, w.shape[1])
    s = (np.abs(wb).max(axis=1) / 7).astype(np.float32)
    q = np.clip(np.rint(wb / s[:, None, :]), -8, 7).reshape(w.shape).astype(np.int8)
    return q, s


def int4_model(opset=21, w=W, block=BLOCK):
    q, s = int4_weight(w, block)
    nodes = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    inits = [_t("w", q, TensorProto.INT4), _t("sw", s), _t("zw", np.zeros(s.shape, np.int8), TensorProto.INT4)]
    return _model(nodes, inits, opset=opset), (q, s)


def int4_reference(x, q, s, block=BLOCK):
    return x @ (q.astype(np.float32) * np.repeat(s, block, axis=0))


def fp8_model():
    sw = np.float32(np.abs(W).max() / 448)
    wq = np.clip(W / sw, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    act, act_inits = _act_qdq(TensorProto.FLOAT8E4M3FN, scale=0.01)
    nodes = act + [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
                   helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    inits = act_inits + [_t("w", wq.astype(np.float32), TensorProto.FLOAT8E4M3FN), _t("sw", sw),
                         _t("zw", np.array(0.0), TensorProto.FLOAT8E4M3FN)]
    return _model(nodes, inits, opset=21), (wq, sw)


def fp8_reference(x, wq, sw, sx=0.01):
    xq = np.clip(x / sx, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * sx
    return xq @ (wq.astype(np.float32) * sw)


def _session(model) -> ort.InferenceSession:
    """onnxruntime session running the graph as written.

    With graph optimizations on, onnxruntime (1.32, CPU) fuses DQ(INT4)->MatMul into MatMulNBits at
    ``session.qdq_matmulnbits_accuracy_level`` 4, which also quantizes the activation to int8
    (measured: 6e-3 max abs difference on the INT4 graph here); the reference is the graph's ONNX
    semantics, so optimizations are off.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _node(model, name):
    (n,) = [n for n in model.graph.node if n.name == name]
    return n


def _set_init(model, name, tensor_or_array, dtype=None):
    t = tensor_or_array if isinstance(tensor_or_array, onnx.TensorProto) else _t(name, tensor_or_array, dtype)
    t.name = name
    for i, old in enumerate(model.graph.initializer):
        if old.name == name:
            model.graph.initializer[i].CopyFrom(t)
            return model
    model.graph.initializer.append(t)
    return model


def _set_attr(node, name, value):
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


# ----------------------------------------------------------------------------- valid graphs
VALID = {
    "w8a8-int8-per-channel": (w8a8_model, w8a8_reference),
    "w4a16-int4-blocked": (int4_model, int4_reference),
    "w8a8-fp8": (fp8_model, fp8_reference),
}


@pytest.mark.parametrize("kind", list(VALID))
def test_valid_graphs_pass_checker_run_in_ort_and_have_no_violations(kind):
    build, reference = VALID[kind]
    model, params = build()
    onnx.checker.check_model(model, full_check=True)
    assert check_model(model) == []
    (y,) = _session(model).run(None, {"x": X})
    ref = reference(X, *params)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # and the quantization did something (not an identity graph)
    assert np.abs(ref - X @ W).max() > 0


def test_graph_without_qdq_has_no_violations():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_t("w", W)])
    assert check_model(model) == []


def test_weight_quantized_by_q_then_dq_is_a_weight_not_an_activation():
    """Q(W float) -> DQ per-channel (TensorRT quantizes the weight at build time) is accepted."""
    q, s = int8_weight()
    act, act_inits = _act_qdq()
    nodes = act + [helper.make_node("QuantizeLinear", ["wf", "sw", "zw"], ["wq"], name="q_w", axis=1),
                   helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dq_w", axis=1),
                   helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    model = _model(nodes, act_inits + [_t("wf", W), _t("sw", s), _t("zw", np.zeros(N, np.int8))])
    onnx.checker.check_model(model, full_check=True)
    assert check_model(model) == []


def test_dq_through_transpose_and_gemm_transb():
    """Weight stored [N, K] with per-channel axis 0, fed to Gemm(transB=1) and to MatMul via a Transpose."""
    q, s = int8_weight()
    act, act_inits = _act_qdq()
    inits = act_inits + [_t("w", q.T.copy()), _t("sw", s), _t("zw", np.zeros(N, np.int8))]
    gemm = act + [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=0),
                  helper.make_node("Gemm", ["xd", "wd"], ["y"], name="gemm", transB=1)]
    mm = act + [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=0),
                helper.make_node("Transpose", ["wd"], ["wt"], name="t", perm=[1, 0]),
                helper.make_node("MatMul", ["xd", "wt"], ["y"], name="mm")]
    for nodes in (gemm, mm):
        model = _model(nodes, inits)
        assert check_model(model) == []
        (y,) = _session(model).run(None, {"x": X})
        np.testing.assert_allclose(y, w8a8_reference(X, q, s), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- one broken graph per rule
def _nonzero_zero_point():
    m, _ = w8a8_model()
    return _set_init(m, "zx", np.array(3), TensorProto.INT8)


def _per_channel_activation():
    m, _ = w8a8_model()
    _set_init(m, "sx", np.full(K, 0.05, np.float32))
    _set_init(m, "zx", np.zeros(K, np.int8))
    for n in ("q_x", "dq_x"):
        _set_attr(_node(m, n), "axis", 1)
    return m


def _blocked_3d():
    w3 = np.stack([W, W])  # [2, K, N] batched weight
    q, s = zip(*(int4_weight(w) for w in w3))
    q, s = np.stack(q), np.stack(s)  # scale [2, K/B, N]
    nodes = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=1, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    inits = [_t("w", q, TensorProto.INT4), _t("sw", s), _t("zw", np.zeros(s.shape, np.int8), TensorProto.INT4)]
    return _model(nodes, inits, x_shape=(2, 3, K))


def _int4_activation():
    q, s = int4_weight()
    act, act_inits = _act_qdq(TensorProto.INT4, scale=0.5)
    nodes = act + [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=0,
                                    block_size=BLOCK),
                   helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    inits = act_inits + [_t("w", q, TensorProto.INT4), _t("sw", s),
                         _t("zw", np.zeros(s.shape, np.int8), TensorProto.INT4)]
    return _model(nodes, inits)


def _negative_scale():
    m, (q, s) = w8a8_model()
    s = s.copy()
    s[3] = -s[3]
    return _set_init(m, "sw", s)


def _scale_graph_input():
    m, _ = w8a8_model()
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "sx"))
    m.graph.input.append(helper.make_tensor_value_info("sx", TensorProto.FLOAT, []))
    return m


def _opset17():
    m, _ = int4_model(opset=17)
    return m


def _uint8_default_type():
    m, _ = w8a8_model()
    for n in ("q_x", "dq_x"):
        node = _node(m, n)
        del node.input[2]
    return m


def _double_scale():
    m, _ = w8a8_model()
    return _set_init(m, "sx", np.float64(0.05))


def _per_channel_wrong_length():
    m, (q, s) = w8a8_model()
    _set_init(m, "sw", np.concatenate([s, s[:1]]))
    return _set_init(m, "zw", np.zeros(N + 1, np.int8))


def _axis_out_of_range():
    m, _ = w8a8_model()
    _set_attr(_node(m, "dq_w"), "axis", 5)
    return m


def _blocked_int8():
    m, (q, s) = int4_model()
    _set_init(m, "w", q.astype(np.int8))
    return _set_init(m, "zw", np.zeros(s.shape, np.int8))


def _block_not_divisible():
    w = (RNG.standard_normal((40, N)) * 0.1).astype(np.float32)
    q, s = int4_weight(w[:32])
    q = np.concatenate([q, q[:8]])
    s = np.concatenate([s, s[:1]])  # [3, N]: ceil(40/16)
    nodes = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=0, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    inits = [_t("w", q, TensorProto.INT4), _t("sw", s), _t("zw", np.zeros(s.shape, np.int8), TensorProto.INT4)]
    return _model(nodes, inits, x_shape=("B", 40))


def _int4_odd():
    w = (RNG.standard_normal((K, 15)) * 0.1).astype(np.float32)
    q, s = int4_weight(w)
    nodes = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=0, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    inits = [_t("w", q, TensorProto.INT4), _t("sw", s), _t("zw", np.zeros(s.shape, np.int8), TensorProto.INT4)]
    return _model(nodes, inits)


def _pair_mismatch():
    m, _ = w8a8_model()
    m.graph.initializer.append(_t("sx2", np.float32(0.1)))
    _node(m, "dq_x").input[1] = "sx2"
    return m


def _weight_axis_input_channels():
    w = (RNG.standard_normal((K, N)) * 0.1).astype(np.float32)
    s = (np.abs(w).max(axis=1) / 127).astype(np.float32)  # per *input* channel: [K]
    q = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    m, _ = w8a8_model()
    _set_init(m, "w", q)
    _set_init(m, "sw", s)
    _set_init(m, "zw", np.zeros(K, np.int8))
    _set_attr(_node(m, "dq_w"), "axis", 0)
    return m


def _dq_feeds_add():
    m, _ = w8a8_model()
    m.graph.node.append(helper.make_node("Relu", ["xd"], ["r"], name="relu"))
    m.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["B", K]))
    return m


def _float_weight_quantized_activation():
    act, act_inits = _act_qdq()
    nodes = act + [helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    return _model(nodes, act_inits + [_t("w", W)])


def _int8_weight_only():
    q, s = int8_weight()
    nodes = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    return _model(nodes, [_t("w", q), _t("sw", s), _t("zw", np.zeros(N, np.int8))])


def _int8_act_fp8_weight():
    m, _ = fp8_model()
    return _set_init(m, "zx", np.array(0), TensorProto.INT8)


BROKEN = {
    "QDQ-ZERO-POINT": _nonzero_zero_point,
    "QDQ-ACT-PER-TENSOR": _per_channel_activation,
    "QDQ-BLOCK-WEIGHT": _blocked_3d,
    "QDQ-INT4-ACTIVATION": _int4_activation,
    "QDQ-SCALE-VALUE": _negative_scale,
    "QDQ-SCALE-CONST": _scale_graph_input,
    "OPSET": _opset17,
    "QDQ-TYPE": _uint8_default_type,
    "QDQ-SCALE-DTYPE": _double_scale,
    "QDQ-SCALE-SHAPE": _per_channel_wrong_length,
    "QDQ-AXIS": _axis_out_of_range,
    "QDQ-BLOCK-TYPE": _blocked_int8,
    "QDQ-BLOCK-SHAPE": _block_not_divisible,
    "QDQ-INT4-ODD": _int4_odd,
    "QDQ-PAIR": _pair_mismatch,
    "QDQ-WEIGHT-AXIS": _weight_axis_input_channels,
    "DQ-CONSUMER": _dq_feeds_add,
    "GEMM-WEIGHT-DQ": _float_weight_quantized_activation,
    "GEMM-ACT-QDQ": _int8_weight_only,
    "GEMM-MIXED-TYPES": _int8_act_fp8_weight,
}


def test_every_rule_has_a_broken_graph():
    assert set(BROKEN) == set(RULES)


@pytest.mark.parametrize("rule", list(BROKEN))
def test_broken_graph_reports_its_rule(rule):
    vs = check_model(BROKEN[rule]())
    assert rule in {v.rule for v in vs}, [str(v) for v in vs]
    for v in vs:
        assert v.rule in RULES and v.message and v.node


def test_violation_carries_node_provenance():
    m = _float_weight_quantized_activation()
    ann = '{"v": 1, "data": {"param": "blocks.3.ff.net.0.weight"}}'
    _node(m, "mm").metadata_props.add(key="adatsq.layer", value=ann)
    (v,) = [v for v in check_model(m) if v.rule == "GEMM-WEIGHT-DQ"]
    assert v.node == "mm"
    assert v.provenance == {"adatsq.layer": ann}
    assert "mm [blocks.3.ff.net.0.weight]: " in str(v)


def test_unnamed_nodes_get_op_and_index():
    m = _nonzero_zero_point()
    for n in m.graph.node:
        n.name = ""
    names = {v.node for v in check_model(m)}
    assert names <= {"QuantizeLinear#0", "DequantizeLinear#1"} and names


# ----------------------------------------------------------------------------- files, build dirs, CLI helper
def test_check_files_external_data_not_loaded_but_scales_read(tmp_path):
    """A model saved with external data: the validator reads scale/zero-point values from it on demand."""
    m = _negative_scale()
    path = tmp_path / "seg.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    report = check_files([path])
    assert not report["ok"] and report["errors"] >= 1
    (f,) = report["files"]
    assert "QDQ-SCALE-VALUE" in {v["rule"] for v in f["violations"]}
    assert f["violations"][0]["file"] == str(path)
    json.dumps(report)  # JSON-able
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(InputError, match="weights.bin"):
        check_files([path])


def test_check_files_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError, match="nope.onnx: no such file"):
        check_files([tmp_path / "nope.onnx"])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0fgarbage")
    with pytest.raises(InputError, match="bad.onnx: not a readable ONNX model"):
        check_files([bad])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.onnx"):
        check_files([empty])
    with pytest.raises(InputError, match="without onnx/manifest.json"):
        check_files([tmp_path])


def test_check_build_dir_reads_manifest_segments(tmp_path):
    (tmp_path / "onnx").mkdir()
    good, _ = w8a8_model()
    onnx.save(good, str(tmp_path / "onnx" / "s0.onnx"))
    onnx.save(_int8_weight_only(), str(tmp_path / "onnx" / "s1.onnx"))
    (tmp_path / "onnx" / "manifest.json").write_text(json.dumps(
        {"segments": [{"name": "s0", "file": "s0.onnx", "steps": [0, 1]},
                      {"name": "s1", "file": "s1.onnx", "steps": [2]}],
         "steps": ["s0", "s0", "s1"]}))
    report = check_files([tmp_path])
    assert [len(f["violations"]) == 0 for f in report["files"]] == [True, False]
    lines = []
    assert main([str(tmp_path)], out=lines.append) == 1
    assert "GEMM-ACT-QDQ" in lines[0] and "FAILED" in lines[0]
    assert main([str(tmp_path / "onnx" / "s0.onnx"), "--json", str(tmp_path / "r.json")], out=lines.append) == 0
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    assert main(["--rules"], out=lines.append) == 0 and "QDQ-ZERO-POINT" in lines[-1]
    with pytest.raises(InputError):
        main([], out=lines.append)


def test_violation_str_and_dict():
    v = Violation("QDQ-PAIR", "dq", "mismatch", {"adatsq.layer": "x"}, file="a.onnx")
    assert str(v) == "a.onnx: QDQ-PAIR dq [x]: mismatch"
    assert v.to_dict()["provenance"] == {"adatsq.layer": "x"}


def test_onnxruntime_quantizer_output(tmp_path):
    """Third-party Q/DQ graphs: onnxruntime's static quantizer. Its default (asymmetric) activations break
    QDQ-ZERO-POINT; with symmetric INT8 settings only adatsq's own contract (Q/DQ on GEMM inputs only:
    ORT also quantizes the MatMul output) is reported."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": RNG.standard_normal((4, K)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    src = tmp_path / "f.onnx"
    onnx.save(_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_t("w", W)], x_shape=(4, K)), str(src))
    rules = {}
    for name, kw in (("default", {}), ("symmetric", dict(
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}))):
        quantize_static(str(src), str(tmp_path / f"{name}.onnx"), Reader(), quant_format=QuantFormat.QDQ, **kw)
        rules[name] = {v.rule for v in check_model(onnx.load(str(tmp_path / f"{name}.onnx")))}
    assert "QDQ-ZERO-POINT" in rules["default"]
    assert rules["symmetric"] <= {"DQ-CONSUMER"}
