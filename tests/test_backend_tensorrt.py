"""TensorRT backend (backends/tensorrt.py).

What runs everywhere: the trtexec script from a hand-made lowered build (parsed back, shapes
checked against the manifest), the optimization-profile shapes, and ``build_engines`` without
TensorRT (clear error, script written, no engine). A control-flow test drives ``build_engines``
with a *stub* ``tensorrt`` module to check what it asks TensorRT for (strong typing, profiles,
weight stripping); it builds no engine and says so. The tests that build and run real engines
need the ``tensorrt`` package and a CUDA GPU and skip otherwise (they skip in adatsq's CPU
workplace, where TensorRT cannot be installed).
"""

from __future__ import annotations

import json
import shlex
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adatsq.backends import tensorrt as trt_backend
from adatsq.backends.manifest import FORMAT, VERSION, sha256_file
from adatsq.backends.tensorrt import (TensorRTError, TensorRTUnavailable, build_engines, profile_shapes,
                                      tensorrt_available, write_trtexec_commands)
from adatsq.backends.validate import check_model
from adatsq.errors import InputError

K, N, T = 32, 16, 8
RNG = np.random.default_rng(1)
W = (RNG.standard_normal((K, N)) * 0.1).astype(np.float32)


def qdq_segment(bits: int, dtype=np.float32) -> onnx.ModelProto:
    """A tiny lowered segment: x[B, T, K] @ W, W8A8 (INT8 per-channel weight, per-tensor activation) or
    W4A16 (INT4 blocked weight-only); activations and scales in ``dtype`` (float32 or float16)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", elem, ["B", "T", K])
    y = helper.make_tensor_value_info("sample", elem, ["B", "T", N])
    if bits == 8:
        s = (np.abs(W).max(axis=0) / 127).astype(dtype)
        q = np.clip(np.rint(W / s.astype(np.float32)), -127, 127).astype(np.int8)
        nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_x"),
                 helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_x"),
                 helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["sample"], name="mm")]
        inits = [numpy_helper.from_array(np.asarray(0.05, dtype), "sx"), numpy_helper.from_array(np.int8(0), "zx"),
                 numpy_helper.from_array(q, "w"), numpy_helper.from_array(s, "sw"),
                 numpy_helper.from_array(np.zeros(N, np.int8), "zw")]
    else:
        wb = W.reshape(K // 16, 16, N)
        s = (np.abs(wb).max(axis=1) / 7).astype(dtype)
        q = np.clip(np.rint(wb / s[:, None, :].astype(np.float32)), -8, 7).reshape(K, N).astype(np.int8)
        nodes = [helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=0, block_size=16),
                 helper.make_node("MatMul", ["x", "wd"], ["sample"], name="mm")]
        inits = [helper.make_tensor("w", TensorProto.INT4, q.shape, q.flatten().tolist()),
                 numpy_helper.from_array(s, "sw"),
                 helper.make_tensor("zw", TensorProto.INT4, s.shape, [0] * s.size)]
    model = helper.make_model(helper.make_graph(nodes, f"w{bits}", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    # as adatsq's exporter does: the example input shapes in the model metadata
    model.metadata_props.add(key="adatsq.model", value=json.dumps({"inputs": {"x": [2, T, K]}}))
    return model


def make_build(tmp_path, *, example=True, dtype=np.float32):
    """A lowered build directory in the format of backends/manifest.py: segment w8 runs steps 0-2, w4 steps 3-4."""
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir(parents=True)
    segs = []
    steps = ["w8", "w8", "w8", "w4", "w4"]
    for name, bits in (("w8", 8), ("w4", 4)):
        model = qdq_segment(bits, dtype)
        if not example:
            del model.metadata_props[:]
        assert check_model(model) == []  # every graph these tests emit passes the validator
        f = onnx_dir / f"{name}.onnx"
        onnx.save(model, str(f))
        segs.append({"name": name, "file": f.name, "steps": [k for k, s in enumerate(steps) if s == name],
                     "sha256": sha256_file(f), "bytes": f.stat().st_size, "assignment_sha256": "-"})
    manifest = {"format": FORMAT, "version": VERSION, "segments": segs, "steps": steps,
                "inputs": [{"name": "x", "dtype": np.dtype(dtype).name, "shape": ["B", "T", K]}],
                "outputs": [{"name": "sample", "dtype": np.dtype(dtype).name, "shape": ["B", "T", N]}],
                "plan": {"file": "plan.json", "sha256": "-"}, "external_data": None}
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path, manifest


def parse_script(path):
    """trtexec lines of the script -> {segment engine name: {flag: value}}."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("trtexec "):
            continue
        args = shlex.split(line)
        flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in args[1:])
        out[flags["saveEngine"]] = flags
    return out


def _shapes(spec: str) -> dict[str, list[int]]:
    return {n: [int(d) for d in s.split("x")] for n, s in (e.rsplit(":", 1) for e in spec.split(","))}


# ----------------------------------------------------------------------------- no TensorRT needed
def test_trtexec_script_one_line_per_segment_with_manifest_shapes(tmp_path):
    build, manifest = make_build(tmp_path)
    path = write_trtexec_commands(build, workspace_gb=2)
    assert path == build / "tensorrt" / "trtexec.sh"
    assert path.stat().st_mode & 0o111  # executable
    text = path.read_text()
    assert text.startswith("#!/bin/sh") and 'cd "$(dirname "$0")/.."' in text
    cmds = parse_script(path)
    assert set(cmds) == {f"tensorrt/{s['name']}.engine" for s in manifest["segments"]}
    for seg in manifest["segments"]:
        flags = cmds[f"tensorrt/{seg['name']}.engine"]
        assert flags["onnx"] == f"onnx/{seg['file']}" and (build / flags["onnx"]).is_file()
        assert flags["stronglyTyped"] is True and "fp16" not in flags and "int8" not in flags
        # B is a batch dim (1 .. 2x the example 2), T pinned to the example 8, K static
        assert _shapes(flags["minShapes"]) == {"x": [1, T, K]}
        assert _shapes(flags["optShapes"]) == {"x": [2, T, K]}
        assert _shapes(flags["maxShapes"]) == {"x": [4, T, K]}
        assert flags["memPoolSize"] == "workspace:2048M"
        assert "stripWeights" not in flags
    assert "# segment w8: steps 0-2" in text and "# segment w4: steps 3-4" in text
    assert text.count("--stripWeights") == 2 and text.count("--refit") == 2  # the variants, as comments
    assert all(line.startswith("#") for line in text.splitlines() if "--stripWeights" in line or "--refit" in line)


def test_trtexec_script_profiles_and_stripped(tmp_path):
    build, _ = make_build(tmp_path)
    path = write_trtexec_commands(build, strip_weights=True, profiles={"T": (4, 8, 64), "B": (1, 1, 2)})
    for flags in parse_script(path).values():
        assert flags["stripWeights"] is True
        assert _shapes(flags["minShapes"]) == {"x": [1, 4, K]}
        assert _shapes(flags["optShapes"]) == {"x": [1, 8, K]}
        assert _shapes(flags["maxShapes"]) == {"x": [2, 64, K]}
    assert "#   with the weights in the engine: trtexec" in path.read_text()


def test_profile_shapes_rules():
    manifest = {"inputs": [{"name": "x", "shape": ["B", "T", K]}, {"name": "t", "shape": ["B"]}]}
    ex = {"x": [2, T, K], "t": [2]}
    shapes = profile_shapes(manifest, ex)
    assert shapes["x"] == ((1, T, K), (2, T, K), (4, T, K)) and shapes["t"] == ((1,), (2,), (4,))
    assert profile_shapes(manifest, ex, {"t": ((3,), (3,), (3,))})["t"] == ((3,), (3,), (3,))
    with pytest.raises(InputError, match="no size for dimension 'T'"):
        profile_shapes(manifest, {"t": [2]})
    with pytest.raises(InputError, match="min <= opt <= max"):
        profile_shapes(manifest, ex, {"T": (9, 8, 16)})
    with pytest.raises(InputError, match="'B' is 2 in one input and 3"):
        profile_shapes(manifest, {"x": [2, T, K], "t": [3]})
    with pytest.raises(InputError, match="rank"):
        profile_shapes(manifest, ex, {"x": ((1,), (1,), (1,))})
    # an unnamed dynamic dimension (ONNX dim_value 0) is named input[axis]; it is not the first axis: pinned
    anon = {"inputs": [{"name": "x", "shape": ["B", 0, K]}]}
    assert profile_shapes(anon, {"x": [2, 5, K]})["x"] == ((1, 5, K), (2, 5, K), (4, 5, K))
    assert profile_shapes(anon, {"x": [2, 5, K]}, {"x[1]": (1, 5, 9)})["x"] == ((1, 1, K), (2, 5, K), (4, 9, K))


def test_script_needs_an_example_or_a_profile(tmp_path):
    build, _ = make_build(tmp_path, example=False)
    with pytest.raises(InputError, match="give profiles="):
        write_trtexec_commands(build)
    cmds = parse_script(write_trtexec_commands(build, profiles={"B": (1, 1, 1), "T": (8, 8, 8)}))
    assert all(_shapes(c["maxShapes"]) == {"x": [1, T, K]} for c in cmds.values())


def test_missing_manifest_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="manifest.json"):
        write_trtexec_commands(tmp_path)
    with pytest.raises(InputError, match="manifest.json"):
        build_engines(tmp_path)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_build_engines_without_tensorrt_stops_clearly_and_writes_no_engine(tmp_path):
    build, _ = make_build(tmp_path)
    with pytest.raises(TensorRTUnavailable, match="no engine was built") as err:
        build_engines(build)
    assert str(build / "tensorrt" / "trtexec.sh") in str(err.value)
    assert isinstance(err.value, InputError)  # the CLI prints it on one line, exit code 2
    assert (build / "tensorrt" / "trtexec.sh").is_file()
    assert sorted(p.name for p in (build / "tensorrt").iterdir()) == ["trtexec.sh"]  # no engine, no engines.json


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_runner_without_tensorrt(tmp_path):
    with pytest.raises(TensorRTUnavailable):
        trt_backend.TensorRTRunner(tmp_path)


def test_fp16_request_on_a_float32_graph_fails_before_tensorrt(tmp_path):
    build, _ = make_build(tmp_path)
    with pytest.raises(InputError, match="inputs \\['x'\\] are float32"):
        build_engines(build, fp16=True)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_fp16_request_on_a_float16_graph_gets_to_tensorrt(tmp_path):
    build, _ = make_build(tmp_path, dtype=np.float16)
    with pytest.raises(TensorRTUnavailable):
        build_engines(build, fp16=True)


# ----------------------------------------------------------------------------- control flow (stub, no engine)
class _StubTRT(types.SimpleNamespace):
    """A stand-in for ``tensorrt`` that records calls. CONTROL-FLOW TEST ONLY: it builds nothing;
    its 'plans' are a marker string, never an engine."""


class _StubLogger:
    WARNING = 2

    def __init__(self, level):
        self.level = level


def _stub_tensorrt(calls: list, fail_parse: bool = False):
    plan_marker = b"NOT-AN-ENGINE: control-flow stub"

    class Network:
        def __init__(self, flags):
            calls.append(("create_network", flags))
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class Parser:
        num_errors = 1

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            self.network.inputs = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
            return not fail_parse

        def get_error(self, i):
            return "stub parse error"

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls.append(("set_shape", name, tuple(mn), tuple(opt), tuple(mx)))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache",))
            return "cache"

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return plan_marker

    return _StubTRT(
        __version__="stub (control-flow test, not TensorRT)",
        Logger=_StubLogger,
        Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=types.SimpleNamespace(STRIP_PLAN="STRIP_PLAN", REFIT_IDENTICAL="REFIT_IDENTICAL"),
    ), plan_marker


def _use_stub(monkeypatch, stub):
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: True)
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: stub)


@pytest.mark.parametrize("strip", [False, True])
def test_control_flow_build_engines_asks_tensorrt_for_the_manifest_profiles(tmp_path, monkeypatch, strip):
    """CONTROL-FLOW TEST with a stub tensorrt module: checks the calls build_engines makes, not an engine."""
    calls = []
    stub, marker = _stub_tensorrt(calls)
    _use_stub(monkeypatch, stub)
    build, manifest = make_build(tmp_path)
    index = build_engines(build, strip_weights=strip, workspace_gb=1, profiles={"T": (4, 8, 16)})
    assert [c for c in calls if c[0] == "create_network"] == [("create_network", 1 << 1)] * 2  # STRONGLY_TYPED
    assert [c[1] for c in calls if c[0] == "parse_from_file"] == [str(build / "onnx" / s["file"])
                                                                    for s in manifest["segments"]]
    assert [c for c in calls if c[0] == "set_shape"] == [("set_shape", "x", (1, 4, K), (2, 8, K), (4, 16, K))] * 2
    assert [c for c in calls if c[0] == "workspace"] == [("workspace", "WORKSPACE", 1 << 30)] * 2
    flags = [c[1] for c in calls if c[0] == "set_flag"]
    assert flags == (["STRIP_PLAN", "REFIT_IDENTICAL"] * 2 if strip else [])
    assert calls.count(("create_timing_cache",)) == 1  # one cache shared by the segments
    # what it wrote: the stub's marker (no engine), indexed with the stub's version string
    assert (build / "tensorrt" / "w8.engine").read_bytes() == marker
    on_disk = json.loads((build / "tensorrt" / "engines.json").read_text())
    assert on_disk == index and index["tensorrt_version"].startswith("stub")
    assert index["steps"] == manifest["steps"] and index["strip_weights"] is strip
    assert [s["steps"] for s in index["segments"]] == [[0, 1, 2], [3, 4]]
    # the trtexec script says the same shapes
    flags = parse_script(build / "tensorrt" / "trtexec.sh")["tensorrt/w4.engine"]
    assert _shapes(flags["maxShapes"]) == {"x": [4, 16, K]} and ("stripWeights" in flags) is strip


def test_control_flow_parse_failure_leaves_no_index(tmp_path, monkeypatch):
    """CONTROL-FLOW TEST (stub tensorrt): a segment TensorRT refuses raises TensorRTError, no engines.json."""
    stub, _ = _stub_tensorrt([], fail_parse=True)
    _use_stub(monkeypatch, stub)
    build, _ = make_build(tmp_path)
    (build / "tensorrt").mkdir()
    (build / "tensorrt" / "engines.json").write_text("{}")  # stale index of an earlier build
    with pytest.raises(TensorRTError, match="stub parse error"):
        build_engines(build)
    assert not (build / "tensorrt" / "engines.json").exists()


def test_control_flow_damaged_segment_is_refused_before_building(tmp_path, monkeypatch):
    """CONTROL-FLOW TEST (stub tensorrt): the manifest's sha256 is checked before TensorRT sees a file."""
    calls = []
    stub, _ = _stub_tensorrt(calls)
    _use_stub(monkeypatch, stub)
    build, _ = make_build(tmp_path)
    with open(build / "onnx" / "w4.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="w4.onnx"):
        build_engines(build)
    assert not [c for c in calls if c[0] == "build_serialized_network"]


# ----------------------------------------------------------------------------- real TensorRT (skips here)
def _needs_gpu_tensorrt():
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    return torch


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("strip", [False, True])
def test_tensorrt_engines_match_onnxruntime(tmp_path, strip, dtype):
    torch = _needs_gpu_tensorrt()
    build, manifest = make_build(tmp_path, dtype=dtype)
    index = build_engines(build, strip_weights=strip, workspace_gb=1, fp16=dtype == np.float16)
    assert index["tensorrt_version"] != "unknown"
    for seg in index["segments"]:
        assert (build / "tensorrt" / seg["engine"]).stat().st_size > 0
    runner = trt_backend.TensorRTRunner(build)
    assert runner.scratch_bytes == max(runner._memory_size(e) for e in runner.engines.values())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for batch in (1, 2, 4):  # inside the profile [1, 4]
        x = RNG.standard_normal((batch, T, K)).astype(dtype)
        for step, seg in enumerate(manifest["steps"]):
            sess = ort.InferenceSession(str(build / "onnx" / f"{seg}.onnx"), so)
            (ref,) = sess.run(None, {"x": x})
            got = runner.run(step, {"x": torch.from_numpy(x)})["sample"].float().cpu().numpy()
            ref = ref.astype(np.float32)
            # INT8 kernels accumulate in another order, fp16 rounds: a tolerance, not equality
            np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    with pytest.raises(InputError, match="outside the engine's optimization profile"):
        runner.run(0, {"x": torch.zeros(8, T, K, dtype=getattr(torch, np.dtype(dtype).name))})
