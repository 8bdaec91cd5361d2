"""The pieces of the onnxruntime CPU benchmark (tools/bench_ort.py) that can be checked fast.

Size accounting (a data file shared by several models counted once), the fused-node counter on
graphs onnxruntime does and does not fuse, the graph ablations, the calibration reader (the
model's own input names and shapes, from captured transformer calls of tiny-flux) and the
JSON/Markdown writer. No timings are asserted: CPUs differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adatsq.tools import bench_ort as bo


# --------------------------------------------------------------------------- helpers
def _lowered_like_layer(path: Path | None = None, out_is_graph_output: bool = True):
    """One linear layer as ``backends/onnx_qdq.lower_segment`` writes it (node names included):
    smoothing Div, activation Q/DQ (int8, static), per-channel int8 weight DQ, MatMul, FP16
    low-rank branch added to the main output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, o, r = 32, 24, 4
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, (k, o)).astype(np.int8), "codes"),
             numpy_helper.from_array((rng.random(o) * 0.01 + 0.001).astype(np.float32), "wscale"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ascale"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array((rng.random(k) + 0.5).astype(np.float32), "smooth"),
             numpy_helper.from_array(rng.standard_normal((k, r)).astype(np.float16), "bt"),
             numpy_helper.from_array(rng.standard_normal((r, o)).astype(np.float16), "at")]
    p = "adatsq/l.weight/seg00/0"
    y = "y" if out_is_graph_output else "y_layer"
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "wscale"], ["wdq"], name="adatsq/l.weight/w8/DequantizeLinear",
                         axis=1),
        helper.make_node("Div", ["x", "smooth"], [f"{p}/x_smooth"], name=f"{p}/Div"),
        helper.make_node("QuantizeLinear", [f"{p}/x_smooth", "ascale", "zp"], [f"{p}/x_q"], name=f"{p}/QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{p}/x_q", "ascale", "zp"], [f"{p}/x_dq"], name=f"{p}/DequantizeLinear"),
        helper.make_node("MatMul", [f"{p}/x_dq", "wdq"], [f"{p}/y_main"], name="l/MatMul"),
        helper.make_node("Cast", ["bt"], [f"{p}/lr_b"], name=f"{p}/Cast_b", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["at"], [f"{p}/lr_a"], name=f"{p}/Cast_a", to=TensorProto.FLOAT),
        helper.make_node("MatMul", [f"{p}/x_smooth", f"{p}/lr_b"], [f"{p}/lr_h"], name=f"{p}/MatMul_lr_b"),
        helper.make_node("MatMul", [f"{p}/lr_h", f"{p}/lr_a"], [f"{p}/lr_y"], name=f"{p}/MatMul_lr_a"),
        helper.make_node("Add", [f"{p}/y_main", f"{p}/lr_y"], [y], name=f"{p}/Add_lr"),
    ]
    if not out_is_graph_output:
        nodes.append(helper.make_node("Relu", [y], ["y"], name="after"))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, o])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(m)
    if path is not None:
        onnx.save_model(m, str(path))
    return m


# --------------------------------------------------------------------------- sizes
def test_size_counts_a_shared_data_file_once(tmp_path):
    import onnx

    m = _lowered_like_layer()
    a, b = tmp_path / "seg00.onnx", tmp_path / "seg01.onnx"
    onnx.save_model(m, str(a), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
                    size_threshold=0)
    m2 = onnx.load(str(a), load_external_data=False)  # a second segment pointing into the same file
    m2.graph.name = "other"
    onnx.save_model(m2, str(b))
    data = tmp_path / "w.data"
    assert bo.external_files(a) == [data.resolve()] == bo.external_files(b)
    one, both = bo.disk_size([a]), bo.disk_size([a, b])
    assert one["bytes"] == a.stat().st_size + data.stat().st_size
    assert both["bytes"] == a.stat().st_size + b.stat().st_size + data.stat().st_size
    assert both["data_bytes"] == data.stat().st_size and both["files"] == 3 and both["data_files"] == ["w.data"]
    assert bo.disk_size([a, a, b]) == both  # the same file named twice counts once
    inline = tmp_path / "inline.onnx"
    onnx.save_model(_lowered_like_layer(), str(inline))  # (saving with external data changed m)
    assert bo.disk_size([inline]) == dict(bytes=inline.stat().st_size, model_bytes=inline.stat().st_size,
                                          data_bytes=0, files=1, data_files=[])
    data.unlink()
    with pytest.raises(FileNotFoundError, match="w.data"):
        bo.disk_size([a])


# --------------------------------------------------------------------------- fusion
def test_fused_node_counter_sees_the_integer_kernels(tmp_path, monkeypatch):
    path = tmp_path / "layer.onnx"
    _lowered_like_layer(path)
    assert bo.op_counts(path)["DequantizeLinear"] == 2
    # where the runner keeps the INT8 fusion (CPUs with VNNI; forced on here): the static INT8
    # activation QDQ + per-channel INT8 weight DQ + MatMul fuse into one kernel; the activation
    # QuantizeLinear stays; the two low-rank MatMuls stay float
    monkeypatch.setenv("ADATSQ_ORT_INT8_FUSION", "on")
    counts = bo.optimized_op_counts(path, tmp_path / "opt.onnx", bo.runner_session_options, "extended")
    assert counts.get("MatMulIntegerToFloat") == 1
    assert counts.get("DequantizeLinear", 0) == 0
    s = bo.fusion_summary(counts)
    assert s["int_kernels"] == {"MatMulIntegerToFloat": 1}
    assert s["n_int_kernels"] == 1 and s["qdq_left"] == {"QuantizeLinear": 1} and s["n_float_matmuls"] == 2
    assert s["nodes"] == sum(counts.values())
    # where it does not (AVX2 without VNNI: the u8 x s8 kernel saturates): no integer kernel, the
    # layer runs as Q/DQ + float MatMul
    monkeypatch.setenv("ADATSQ_ORT_INT8_FUSION", "off")
    s = bo.fusion_summary(bo.optimized_op_counts(path, tmp_path / "opt2.onnx", bo.runner_session_options, "extended"))
    assert s["n_int_kernels"] == 0 and s["n_float_matmuls"] == 3


def test_fused_node_counter_on_quantize_dynamic_of_tiny_flux(artifacts, tmp_path):
    fp32 = artifacts.onnx_path("tiny-flux")
    q = tmp_path / "dyn.onnx"
    bo.ort_quantize_dynamic(fp32, q)
    f = bo.fusion_summary(bo.optimized_op_counts(fp32, tmp_path / "fp.opt.onnx", bo.plain_session_options, "all"))
    d = bo.fusion_summary(bo.optimized_op_counts(q, tmp_path / "dyn.opt.onnx", bo.plain_session_options, "all"))
    assert f["n_int_kernels"] == 0 and f["n_float_matmuls"] > 0
    linear = sum(1 for i in artifacts.table("tiny-flux") if i.kind == "linear")
    assert d["n_int_kernels"] >= linear > 0  # every linear layer became an integer kernel
    assert set(d["int_kernels"]) <= {"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger"}
    assert d["n_float_matmuls"] < f["n_float_matmuls"]


@pytest.mark.parametrize("out_is_graph_output", [True, False])
def test_ablations_remove_what_they_name(tmp_path, out_is_graph_output):
    import onnx

    m = _lowered_like_layer(out_is_graph_output=out_is_graph_output)
    x = np.random.default_rng(1).standard_normal((2, 16, 32)).astype(np.float32)
    for drop, gone in ((("smooth",), {"Div"}), (("lowrank",), {"Cast", "Add"}),
                       (("smooth", "lowrank", "actq"), {"Div", "Cast", "Add", "QuantizeLinear"})):
        a = bo.ablate_model(m, drop)
        onnx.checker.check_model(a)
        path = tmp_path / f"{'-'.join(drop)}.onnx"
        onnx.save_model(a, str(path))
        ops = bo.op_counts(path)
        assert not gone & set(ops), (drop, ops)
        assert bo.op_counts(path).get("MatMul", 0) == (1 if "lowrank" in drop else 3)
        out = bo.make_session(path, bo.plain_session_options(1)).run(None, {"x": x})[0]
        assert out.shape == (2, 16, 24)
    assert len(m.graph.node) == 10 + (0 if out_is_graph_output else 1)  # the input model is not modified
    with pytest.raises(ValueError, match="no lowered smooth"):
        bo.ablate_model(bo.ablate_model(m, ("smooth",)), ("smooth",))


# --------------------------------------------------------------------------- calibration inputs
def test_calibration_reader_yields_the_models_inputs(artifacts, tmp_path):
    fp32 = artifacts.onnx_path("tiny-flux")
    sess = bo.make_session(fp32, bo.plain_session_options(1))
    names = [i.name for i in sess.get_inputs()]
    model = artifacts.model("tiny-flux")
    cap = bo.InputCapture(model, names)
    with cap, torch.no_grad():
        for seed in (0, 1):
            model(**artifacts.inputs("tiny-flux", seed=seed), return_dict=False)
    model(**artifacts.inputs("tiny-flux", seed=2), return_dict=False)  # after the hook is gone: not captured
    assert len(cap.calls) == 2
    bo.save_inputs(tmp_path / "calls.npz", cap.calls)
    calls = bo.load_inputs(tmp_path / "calls.npz")
    assert [sorted(c) for c in calls] == [sorted(names)] * 2
    reader = bo.calibration_reader(calls, names)
    from onnxruntime.quantization import CalibrationDataReader

    assert isinstance(reader, CalibrationDataReader) and len(reader) == 2
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    got = []
    while (item := reader.get_next()) is not None:
        assert list(item) == names
        for k, v in item.items():
            assert v.ndim == len(shapes[k]) and v.dtype == np.float32
            assert all(isinstance(d, str) or d == s for d, s in zip(shapes[k], v.shape)), (k, shapes[k], v.shape)
        assert sess.run(None, item)[0].shape[0] == item["hidden_states"].shape[0]
        got.append(item)
    assert len(got) == 2 and not np.array_equal(got[0]["hidden_states"], got[1]["hidden_states"])
    reader.rewind()
    assert reader.get_next() is not None
    with pytest.raises(ValueError, match="lacks inputs"):
        bo.CalibrationReader([{k: v for k, v in calls[0].items() if k != "timestep"}], names)
    # quantize_static with it: QDQ nodes with calibrated (finite, nonzero) scales
    out = tmp_path / "static.onnx"
    bo._quantize_static_qdq(fp32, out, calls, names, "uint8", False, "")
    assert bo.op_counts(out).get("QuantizeLinear", 0) > 0


def test_step_feeds_pair_the_cfg_halves_of_one_sample():
    b = 3
    call = dict(hidden_states=np.arange(2 * b)[:, None, None] * np.ones((1, 5, 4)),
                timestep=np.arange(2 * b, dtype=np.float32), img_ids=np.zeros((5, 3)))
    f = bo.step_feeds([call, call], step=1, sample_index=1, batch_inputs=("hidden_states", "timestep"))
    assert f["timestep"].tolist() == [1.0, 1.0 + b]
    assert f["hidden_states"][:, 0, 0].tolist() == [1.0, 1.0 + b] and f["img_ids"].shape == (5, 3)


# --------------------------------------------------------------------------- report
def _result():
    row = dict(name="w8a8", kind="build", how="adatsq build --budget W8A8", level="extended", ms_per_step=12.345,
               speedup_vs_fp32_ort=1.5, speedup_vs_torch=2.25, size=dict(bytes=5_000_000), size_ratio=0.291,
               fusion=dict(int_kernels={"MatMulIntegerToFloat": 34}, n_qdq_left=34, n_float_matmuls=70),
               quality=dict(judge_accuracy=0.875, fid=12.5, psnr_vs_fp=30.125, ssim_vs_fp=0.9876))
    return dict(format=bo.FORMAT, version=bo.VERSION, command="python -m adatsq.tools.bench_ort --out x.json",
                cpu=dict(model_name="Test CPU 9000", isa="AVX-512 VNNI", cores=2, flags={"avx2": True}),
                environment=dict(onnxruntime="1.32.0"),
                timing=dict(threads=2, batch=2, tokens=260, runs=30, warmup=5, rounds=2, busy_before=0.04),
                quality=dict(samples=64, seed=0, steps=20, guidance=2.0),
                variants=[row, dict(name="ort-static-s8", kind="ort-static", how="QDQ int8", level="all",
                                    error="onnxruntime cannot load it: Fail: boom")],
                ablations=[dict(name="w8a8-no-lowrank", of="w8a8", removed="lowrank", level="extended",
                                ms_per_step=7.5, fusion=dict(int_kernels={"MatMulIntegerToFloat": 34}))])


def test_json_and_markdown_are_written_atomically(tmp_path):
    res = _result()
    out, md = tmp_path / "r" / "ort.json", tmp_path / "r" / "ort.md"
    bo.write_outputs(res, out, md)
    assert json.loads(out.read_text()) == res
    text = md.read_text()
    assert "Test CPU 9000" in text and "AVX-512 VNNI" in text and "2 intra-op threads" in text
    line = next(x for x in text.splitlines() if x.startswith("| w8a8 |"))
    for s in ("12.35", "1.50x", "2.25x", "5.00", "0.291", "MatMulIntegerToFloat 34", "0.875", "12.50", "30.12"):
        assert s in line, (s, line)
    assert "did not run: onnxruntime cannot load it: Fail: boom" in text
    assert "| w8a8 | lowrank | extended | 7.50 |" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["ort.json", "ort.md"]  # no temporary files left
    with pytest.raises(TypeError):  # a result that cannot be serialised leaves the old files in place
        bo.write_outputs(dict(res, bad=object()), out, None)
    assert json.loads(out.read_text()) == res
    assert sorted(p.name for p in out.parent.iterdir()) == ["ort.json", "ort.md"]


def test_cpu_info_names_the_cpu_and_its_isa():
    info = bo.cpu_info()
    assert info["model_name"] and info["cores"] >= 1
    assert set(info["flags"]) == set(bo.CPU_FLAGS) and all(isinstance(v, bool) for v in info["flags"].values())
    assert info["isa"] in ("AMX", "AVX-512 VNNI", "AVX-VNNI", "AVX2", "pre-AVX2")
