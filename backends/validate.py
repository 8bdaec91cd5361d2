"""Static validator for TensorRT explicit quantization (Q/DQ ONNX graphs).

``check_model(model)`` walks an ONNX graph and reports every QuantizeLinear / DequantizeLinear
(Q/DQ) node and every quantized GEMM (MatMul, Gemm, Conv) that TensorRT's ONNX parser would reject,
or that would not give the precision the plan asked for. ``check_files(paths)`` does the same for
files (or a build directory with ``onnx/manifest.json``) without loading the weights' external
data; ``main(argv)`` is what ``adatsq check`` calls.

Sources for the rules (read 2026-11; the TensorRT pages are those of TensorRT 10.x):

* [WQT] "Working with Quantized Types", TensorRT developer guide:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html
  (symmetric quantization only; INT8, FP8E4M3 and FP4 quantize activations *and* weights, "INT4
  (signed 4-bit integer, weight-only quantization)"; per-tensor, per-channel or block scaling).
* [EQ] "Explicit Quantization":
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
  (use explicit quantization with strong typing; pre-quantized weights need an IDequantizeLayer
  between the weights and the linear operator that uses them).
* [DQL] ``IDequantizeLayer`` / ``IQuantizeLayer`` API reference (TensorRT 10.x C++ API,
  ``classnvinfer1_1_1_i_dequantize_layer.html``): scale and zero point have identical dimensions
  and rank <= 2; zero point all zeros ("only symmetric quantization is supported"); scale is a
  scalar (per-tensor), 1-D of the quantization axis' size (per-channel) or of the input's rank
  (block quantization, blocking on the last or second-to-last dimension); scale coefficients
  strictly positive.
* [OPS] Operator reference, Quantize:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Quantize.html
  (scale a build-time constant, float32/float16/bfloat16; block quantization for INT4 in
  TensorRT 10.0, later extended to FP4/FP8/INT8).
* [PARSER] onnx-tensorrt ``docs/operators.md`` and ``QuantDequantLinearHelper`` in
  ``onnxOpImporters.cpp`` (github.com/onnx/onnx-tensorrt, 10.0 branch): ``x_zero_point`` must be
  zero; UINT8 is not a quantized type (it is read as INT8 with a warning); "Activations-quantization
  does not support per-axis quantization"; INT4 tensors need an even last dimension.
* ONNX operator specs QuantizeLinear / DequantizeLinear (opset 10: per-tensor; 13: ``axis``;
  19: float8 types; 21: INT4/UINT4, ``block_size``, ``output_dtype``).

Each rule has a ``basis``: ``trt`` where TensorRT (parser or builder) rejects the graph or
computes something else than onnxruntime would, ``adatsq`` where the graph is legal for TensorRT
but breaks the contract of adatsq's lowering (GEMM inputs only, the plan's precisions only).

Decisions (documented in docs/tensorrt.md):

* opset: >= 13 for any Q/DQ (``axis``), >= 19 with FP8, >= 21 with INT4 or ``block_size``.
* weight-only INT8/FP8 (a DQ'd 8-bit weight into a GEMM whose activation is not quantized) is
  reported (``GEMM-ACT-QDQ``): [WQT] lists weight-only quantization for INT4 only, and adatsq's
  ``tensorrt`` lattice has no W8A16 point.
* blocked (``block_size``) DQ is accepted for INT4 weights only: TensorRT 10.0 documents block
  quantization for INT4 only; later 10.x releases accept FP8/INT8 blocks, but adatsq does not emit
  them, so a blocked INT8 DQ means a lowering bug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import InputError

# ----------------------------------------------------------------------------- rules
#: rule id -> (basis, one-line explanation)
RULES: dict[str, tuple[str, str]] = {
    "OPSET": ("trt", "the default-domain opset must be >= 13 for Q/DQ, >= 19 with FP8, >= 21 with INT4 or "
                     "block_size"),
    "QDQ-TYPE": ("trt", "quantized type must be INT8, INT4 or FLOAT8E4M3FN (UINT8, the ONNX default, is not one)"),
    "QDQ-ZERO-POINT": ("trt", "zero point must be a constant of zeros (TensorRT quantization is symmetric)"),
    "QDQ-SCALE-CONST": ("trt", "scale (and zero point) must be a constant initializer or Constant node, not a "
                               "graph input or computed"),
    "QDQ-SCALE-VALUE": ("trt", "scale coefficients must be positive and finite"),
    "QDQ-SCALE-DTYPE": ("trt", "scale must be float32, float16 or bfloat16"),
    "QDQ-SCALE-SHAPE": ("trt", "scale is a scalar (per-tensor), 1-D of the quantized axis' size (per-channel) "
                               "or, with block_size, of the input's rank; zero point has the scale's shape"),
    "QDQ-AXIS": ("trt", "axis must be in range of the quantized tensor's rank"),
    "QDQ-BLOCK-WEIGHT": ("trt", "block_size only on a DequantizeLinear of a constant 2-D weight (scale rank <= 2)"),
    "QDQ-BLOCK-TYPE": ("adatsq", "blocked DequantizeLinear only with INT4 (TensorRT 10.0 documents blocks for "
                                 "INT4 only)"),
    "QDQ-BLOCK-SHAPE": ("trt", "blocked scale = weight shape with the blocked axis divided by block_size; that "
                               "axis divisible by block_size"),
    "QDQ-INT4-ACTIVATION": ("trt", "INT4 is weight-only: INT4 Q/DQ only on constant inputs"),
    "QDQ-INT4-ODD": ("trt", "an INT4 tensor needs an even last dimension (two values a byte)"),
    "QDQ-ACT-PER-TENSOR": ("trt", "activation (non-constant) Q/DQ must be per-tensor"),
    "QDQ-PAIR": ("trt", "a QuantizeLinear feeds DequantizeLinear nodes only, with the same scale, zero point, "
                        "type, axis and block_size"),
    "QDQ-WEIGHT-AXIS": ("adatsq", "per-channel weight scale must run along the GEMM's output channels"),
    "DQ-CONSUMER": ("adatsq", "a DequantizeLinear output feeds a GEMM, directly or through Transpose/Reshape only"),
    "GEMM-WEIGHT-DQ": ("trt", "a GEMM with a quantized activation needs a DequantizeLinear on its weight"),
    "GEMM-ACT-QDQ": ("trt", "a GEMM with an INT8/FP8 weight needs a Q->DQ on every activation input "
                            "(weight-only is INT4 only)"),
    "GEMM-MIXED-TYPES": ("trt", "a quantized GEMM's inputs must share one quantized type (INT8xINT8, FP8xFP8); "
                                "INT4 weights take a 16/32-bit activation"),
}

_GEMMS = ("MatMul", "Gemm", "Conv")
_PASS = ("Transpose", "Reshape")
_QTYPES = {"INT8", "INT4", "FLOAT8E4M3FN"}
_SCALE_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16"}


@dataclass
class Violation:
    """One broken rule at one node."""

    rule: str
    node: str
    message: str
    provenance: dict[str, str] | None = None  #: the node's ``metadata_props`` (adatsq.layer, name scopes...)
    severity: str = "error"
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        layer = _layer_label(self.provenance)
        layer = f" [{layer}]" if layer else ""
        return f"{where}{self.rule} {self.node}{layer}: {self.message}"


def _layer_label(prov: dict[str, str] | None) -> str:
    """The layer a node belongs to: ``adatsq.layer``'s parameter, else the exporter's name scope."""
    if not prov:
        return ""
    raw = prov.get("adatsq.layer")
    if raw:
        try:
            data = json.loads(raw)
            data = data.get("data", data) if isinstance(data, dict) else data
            if isinstance(data, dict):
                for k in ("param", "name", "layer"):
                    if isinstance(data.get(k), str):
                        return data[k]
        except (json.JSONDecodeError, AttributeError):
            pass
        return _short(raw)
    scopes = prov.get("pkg.torch.onnx.name_scopes")
    return _short(scopes) if scopes else ""


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------- graph helpers
class _Graph:
    """Index of one ONNX graph: producers, consumers, constants (values read lazily)."""

    def __init__(self, model, base_dir: str | None):
        import onnx

        self.onnx = onnx
        self.model = model
        g = model.graph
        self.base_dir = base_dir
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self.inits = {t.name: t for t in g.initializer if t.name not in self.graph_inputs}
        self.const_nodes = {}
        self.producer = {}
        self.consumers: dict[str, list] = {}
        self.names = {}
        for i, n in enumerate(g.node):
            self.names[id(n)] = n.name or f"{n.op_type}#{i}"
            for o in n.output:
                self.producer[o] = n
            for x in n.input:
                if x:
                    self.consumers.setdefault(x, []).append(n)
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                self.const_nodes[n.output[0]] = n
        self._values: dict[str, Any] = {}

    def name(self, node) -> str:
        return self.names[id(node)]

    def is_const(self, tensor: str) -> bool:
        return tensor in self.inits or tensor in self.const_nodes

    def dtype(self, tensor: str) -> str | None:
        """ONNX element type name of a constant (initializer or Constant node), else None."""
        t = self._tensor_proto(tensor)
        if t is not None:
            return self.onnx.TensorProto.DataType.Name(t.data_type)
        return None

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        t = self._tensor_proto(tensor)
        if t is not None:
            return tuple(int(d) for d in t.dims)
        if tensor in self.const_nodes:  # value_float(s)/value_int(s)
            v = self.value(tensor)
            return None if v is None else tuple(v.shape)
        return None

    def _tensor_proto(self, tensor: str):
        if tensor in self.inits:
            return self.inits[tensor]
        n = self.const_nodes.get(tensor)
        if n is not None:
            for a in n.attribute:
                if a.name == "value":
                    return a.t
        return None

    def value(self, tensor: str):
        """numpy value of a constant (reads external data of that tensor only), None if not constant."""
        import numpy as np
        from onnx import numpy_helper

        if tensor in self._values:
            return self._values[tensor]
        val = None
        t = self._tensor_proto(tensor)
        if t is not None:
            if t.data_location == self.onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                loc = os.path.join(self.base_dir or "", info.get("location", ""))
                if not os.path.isfile(loc):
                    raise InputError(f"{loc}: external data of tensor {tensor!r} is missing")
            try:
                val = numpy_helper.to_array(t, base_dir=self.base_dir or "")
            except Exception as exc:  # corrupt external data
                raise InputError(f"cannot read tensor {tensor!r} ({type(exc).__name__}: {exc})") from None
        elif tensor in self.const_nodes:
            for a in self.const_nodes[tensor].attribute:
                if a.name == "value_float":
                    val = np.asarray(a.f, dtype=np.float32)
                elif a.name == "value_floats":
                    val = np.asarray(list(a.floats), dtype=np.float32)
                elif a.name == "value_int":
                    val = np.asarray(a.i, dtype=np.int64)
                elif a.name == "value_ints":
                    val = np.asarray(list(a.ints), dtype=np.int64)
        self._values[tensor] = val
        return val

    def weight_root(self, tensor: str) -> str:
        """The tensor a DequantizeLinear reads, or the input of the QuantizeLinear that made it."""
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "QuantizeLinear" and p.input:
            return p.input[0]
        return tensor

    def source(self, tensor: str):
        """Follow Transpose/Reshape (and Identity) upwards: (producer or None, [pass-through nodes])."""
        chain = []
        while True:
            p = self.producer.get(tensor)
            if p is not None and (p.op_type in _PASS or p.op_type == "Identity") and p.input:
                chain.append(p)
                tensor = p.input[0]
                continue
            return p, tensor, chain


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _provenance(node) -> dict[str, str] | None:
    props = {p.key: p.value for p in node.metadata_props}
    return props or None


# ----------------------------------------------------------------------------- Q/DQ facts
@dataclass
class _QDQ:
    node: Any
    kind: str  # "Q" or "DQ"
    data: str
    scale: str
    zero: str | None
    qtype: str | None  # ONNX type name of the quantized side
    axis: int
    block_size: int
    const_input: bool  # the data input is a constant (a weight), or for a DQ, a Q of a constant
    shape: tuple[int, ...] | None  # shape of that constant when known
    granularity: str = "?"  # per-tensor / per-channel / blocked

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def _qtype(g: _Graph, node) -> str | None:
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "QuantizeLinear":
        if zero is not None:
            return g.dtype(zero) or _graph_type(g, zero)
        od = _attr(node, "output_dtype", 0)
        if od:
            return g.onnx.TensorProto.DataType.Name(od)
        return "UINT8"  # ONNX default
    # DequantizeLinear: the data input's type
    x = node.input[0]
    t = g.dtype(x)
    if t is not None:
        return t
    p = g.producer.get(x)
    if p is not None and p.op_type == "QuantizeLinear":
        return _qtype(g, p)
    if zero is not None:
        return g.dtype(zero) or _graph_type(g, zero)
    return _graph_type(g, x)


def _graph_type(g: _Graph, tensor: str) -> str | None:
    """Element type of a non-constant tensor from the graph's inputs / value_info / outputs."""
    if not hasattr(g, "_vi_types"):
        gr = g.model.graph
        g._vi_types = {vi.name: g.onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
                       for vi in list(gr.input) + list(gr.value_info) + list(gr.output)
                       if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    return g._vi_types.get(tensor)


def _qdq_facts(g: _Graph, node) -> _QDQ:
    data = node.input[0]
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    root = g.weight_root(data) if node.op_type == "DequantizeLinear" else data
    const = g.is_const(root)
    shape = g.shape(root) if const else None
    return _QDQ(node=node, kind="Q" if node.op_type == "QuantizeLinear" else "DQ", data=data,
                scale=node.input[1] if len(node.input) > 1 else "", zero=zero, qtype=_qtype(g, node),
                axis=int(_attr(node, "axis", 1)), block_size=int(_attr(node, "block_size", 0) or 0),
                const_input=const, shape=shape)


# ----------------------------------------------------------------------------- the checker
def check_model(model, *, target: str = "tensorrt", base_dir: str | None = None) -> list[Violation]:
    """Violations of TensorRT's explicit-quantization rules in ``model`` (an onnx.ModelProto).

    ``base_dir``: where external data lives (only scale and zero-point values are read from it).
    A graph without Q/DQ nodes has no violations.
    """
    if target != "tensorrt":
        raise InputError(f"check: unknown target {target!r} (known: tensorrt)")
    g = _Graph(model, base_dir)
    out: list[Violation] = []

    def report(rule: str, node, message: str):
        assert rule in RULES, rule
        out.append(Violation(rule=rule, node=g.name(node) if node is not None else "<model>", message=message,
                             provenance=_provenance(node) if node is not None else None))

    qdq = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx"):
            qdq[id(n)] = _qdq_facts(g, n)
    if not qdq:
        return out

    # ---- opset
    opset = _opset(model)
    need, why = 13, "Q/DQ with an axis"
    if any(f.qtype == "FLOAT8E4M3FN" for f in qdq.values()):
        need, why = 19, "FP8 Q/DQ"
    if any(f.qtype == "INT4" or f.block_size for f in qdq.values()):
        need, why = 21, "INT4 or blocked Q/DQ"
    if opset < need:
        report("OPSET", None, f"opset {opset} < {need} needed for {why}")

    for f in qdq.values():
        _check_qdq(g, f, report)
    for f in qdq.values():
        if f.kind == "Q":
            _check_pair(g, f, qdq, report)
        else:
            _check_dq_consumers(g, f, report)
    for n in model.graph.node:
        if n.op_type in _GEMMS and n.domain in ("", "ai.onnx"):
            _check_gemm(g, n, qdq, report)
    return out


def _check_qdq(g: _Graph, f: _QDQ, report) -> None:
    import numpy as np

    n = f.node
    what = "QuantizeLinear" if f.kind == "Q" else "DequantizeLinear"
    # type
    if f.qtype is None:
        report("QDQ-TYPE", n, f"{what}: cannot tell the quantized type (give a zero point or output_dtype)")
    elif f.qtype not in _QTYPES:
        report("QDQ-TYPE", n, f"{what}: quantized type {f.qtype} is not INT8, INT4 or FLOAT8E4M3FN")
    # scale: constant, dtype, values
    scale_ok = bool(f.scale) and g.is_const(f.scale)
    if not scale_ok:
        src = "a graph input" if f.scale in g.graph_inputs else "computed by the graph"
        report("QDQ-SCALE-CONST", n, f"{what}: scale {f.scale!r} is {src}, not a constant")
    if f.zero is not None and not g.is_const(f.zero):
        report("QDQ-SCALE-CONST", n, f"{what}: zero point {f.zero!r} is not a constant")
    sshape = g.shape(f.scale) if scale_ok else None
    if scale_ok:
        sv = g.value(f.scale)
        sdt = g.dtype(f.scale) or ("FLOAT" if sv is not None and sv.dtype == np.float32 else None)
        if sdt not in _SCALE_TYPES:
            report("QDQ-SCALE-DTYPE", n, f"{what}: scale {f.scale!r} is {sdt}, not float32/float16/bfloat16")
        if sv is not None:
            sv = np.asarray(sv).astype(np.float64)
            if sv.size == 0 or not np.all(np.isfinite(sv)) or not np.all(sv > 0):
                bad = sv[~(np.isfinite(sv) & (sv > 0))] if sv.size else sv
                report("QDQ-SCALE-VALUE", n, f"{what}: scale {f.scale!r} has {bad.size} non-positive or non-finite "
                                             f"value(s) (e.g. {bad.flat[0] if bad.size else 'empty'})")
    # zero point: zeros, same type as the quantized side, same shape as scale
    if f.zero is not None and g.is_const(f.zero):
        zv = g.value(f.zero)
        if zv is not None and np.any(np.asarray(zv).astype(np.float64) != 0):
            report("QDQ-ZERO-POINT", n, f"{what}: zero point {f.zero!r} is not all zeros (asymmetric quantization)")
        zshape = g.shape(f.zero)
        if sshape is not None and zshape is not None and zshape != sshape and not (
                _volume(zshape) == 1 and _volume(sshape) == 1):
            report("QDQ-SCALE-SHAPE", n, f"{what}: zero point shape {list(zshape)} != scale shape {list(sshape)}")
    # granularity
    if sshape is None:
        return
    rank = f.rank
    if len(sshape) > 2:
        report("QDQ-SCALE-SHAPE", n, f"{what}: scale rank {len(sshape)} > 2")
    if f.block_size:
        f.granularity = "blocked"
        _check_blocked(g, f, sshape, report)
    elif _volume(sshape) == 1 and len(sshape) <= 1:
        f.granularity = "per-tensor"
    elif len(sshape) == 1:
        f.granularity = "per-channel"
        if rank is not None:
            ax = f.axis + rank if f.axis < 0 else f.axis
            if not 0 <= ax < rank:
                report("QDQ-AXIS", n, f"{what}: axis {f.axis} out of range for rank {rank}")
            else:
                dim = f.shape[ax]
                if sshape[0] != dim:
                    report("QDQ-SCALE-SHAPE", n, f"{what}: per-channel scale has {sshape[0]} values, "
                                                 f"axis {f.axis} has size {dim}")
    else:
        f.granularity = "blocked?"
        report("QDQ-SCALE-SHAPE", n, f"{what}: scale of shape {list(sshape)} without block_size "
                                     "(expected a scalar or a 1-D per-channel scale)")
    # activations: per-tensor, never INT4
    if not f.const_input:
        if f.qtype == "INT4":
            report("QDQ-INT4-ACTIVATION", n, f"{what}: INT4 on activation {f.data!r} (INT4 is weight-only)")
        if f.granularity != "per-tensor":
            report("QDQ-ACT-PER-TENSOR", n, f"{what}: {f.granularity} scale on activation {f.data!r}")
    elif f.qtype == "INT4":
        shape = f.shape
        if shape and shape[-1] % 2:
            report("QDQ-INT4-ODD", n, f"{what}: INT4 weight {f.data!r} of shape {list(shape)} has an odd last "
                                      "dimension")


def _check_blocked(g: _Graph, f: _QDQ, sshape, report) -> None:
    n = f.node
    if f.kind != "DQ" or not f.const_input or f.rank != 2:
        where = "a QuantizeLinear" if f.kind == "Q" else (
            f"activation {f.data!r}" if not f.const_input else f"a {f.rank}-D weight")
        report("QDQ-BLOCK-WEIGHT", n, f"block_size={f.block_size} on {where} (blocks: DequantizeLinear of a "
                                      "constant 2-D weight only)")
    if f.qtype != "INT4":
        report("QDQ-BLOCK-TYPE", n, f"blocked DequantizeLinear of type {f.qtype} (INT4 only)")
    shape = f.shape
    if shape is None:
        return
    rank = len(shape)
    ax = f.axis + rank if f.axis < 0 else f.axis
    if not 0 <= ax < rank:
        report("QDQ-AXIS", n, f"axis {f.axis} out of range for rank {rank}")
        return
    if len(sshape) != rank:
        report("QDQ-BLOCK-SHAPE", n, f"blocked scale rank {len(sshape)} != weight rank {rank}")
        return
    if ax < rank - 2:
        report("QDQ-BLOCK-SHAPE", n, f"blocked axis {f.axis} is not the last or second-to-last dimension")
    if shape[ax] % f.block_size:
        report("QDQ-BLOCK-SHAPE", n, f"weight dimension {shape[ax]} (axis {f.axis}) is not divisible by "
                                     f"block_size {f.block_size}")
    want = list(shape)
    want[ax] = -(-shape[ax] // f.block_size)
    if list(sshape) != want:
        report("QDQ-BLOCK-SHAPE", n, f"blocked scale shape {list(sshape)} != {want} (weight {list(shape)}, "
                                     f"axis {f.axis}, block_size {f.block_size})")


def _volume(shape) -> int:
    v = 1
    for d in shape:
        v *= int(d)
    return v


def _same_const(g: _Graph, a: str | None, b: str | None) -> bool:
    import numpy as np

    if a == b:
        return True
    if a is None or b is None or not (g.is_const(a) and g.is_const(b)):
        return False
    if g.dtype(a) != g.dtype(b):
        return False
    va, vb = g.value(a), g.value(b)
    if va is None or vb is None:
        return False
    va, vb = np.asarray(va), np.asarray(vb)
    return va.shape == vb.shape and bool(np.array_equal(va.astype(np.float64), vb.astype(np.float64)))


def _check_pair(g: _Graph, q: _QDQ, qdq: dict, report) -> None:
    out = q.node.output[0]
    cons = g.consumers.get(out, [])
    if out in g.graph_outputs:
        report("QDQ-PAIR", q.node, "QuantizeLinear output is a graph output (no DequantizeLinear)")
    if not cons and out not in g.graph_outputs:
        report("QDQ-PAIR", q.node, "QuantizeLinear output is unused")
    for c in cons:
        d = qdq.get(id(c))
        if d is None or d.kind != "DQ":
            report("QDQ-PAIR", q.node, f"QuantizeLinear output feeds {c.op_type} {g.name(c)!r}, not a DequantizeLinear")
            continue
        diffs = []
        if not _same_const(g, q.scale, d.scale):
            diffs.append(f"scale {q.scale!r} vs {d.scale!r}")
        qz, dz = q.zero, d.zero
        if (qz is None) != (dz is None):
            # a missing zero point means 0 of the same type: equal only if the other is all zeros and typed alike
            other = qz or dz
            if not (g.is_const(other) and g.value(other) is not None and not g.value(other).astype(float).any()
                    and (g.dtype(other) == q.qtype)):
                diffs.append("zero point present on one side only")
        elif qz is not None and not _same_const(g, qz, dz):
            diffs.append(f"zero point {qz!r} vs {dz!r}")
        if q.qtype != d.qtype:
            diffs.append(f"type {q.qtype} vs {d.qtype}")
        if q.granularity != "per-tensor" or d.granularity != "per-tensor":
            if q.axis != d.axis:
                diffs.append(f"axis {q.axis} vs {d.axis}")
        if q.block_size != d.block_size:
            diffs.append(f"block_size {q.block_size} vs {d.block_size}")
        if diffs:
            report("QDQ-PAIR", c, f"Q {g.name(q.node)!r} -> DQ mismatch: " + "; ".join(diffs))


def _check_dq_consumers(g: _Graph, d: _QDQ, report) -> None:
    frontier = [d.node.output[0]]
    seen = set()
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.graph_outputs:
            report("DQ-CONSUMER", d.node, f"dequantized tensor {t!r} is a graph output")
        cons = g.consumers.get(t, [])
        if not cons and t not in g.graph_outputs:
            report("DQ-CONSUMER", d.node, f"dequantized tensor {t!r} is unused")
        for c in cons:
            if c.op_type in _GEMMS:
                continue
            if c.op_type in _PASS and c.input and c.input[0] == t:
                frontier.append(c.output[0])
                continue
            report("DQ-CONSUMER", d.node, f"DequantizeLinear output reaches {c.op_type} {g.name(c)!r} "
                                          "(only MatMul/Gemm/Conv, through Transpose/Reshape)")


def _gemm_roles(g: _Graph, n) -> tuple[list[int], list[int]]:
    """(weight input indices, activation input indices) of a GEMM: constants are weights."""
    data_inputs = [0, 1]
    weights, acts = [], []
    for i in data_inputs:
        if i >= len(n.input) or not n.input[i]:
            continue
        p, t, _ = g.source(n.input[i])
        src = t
        if p is not None and p.op_type == "DequantizeLinear":
            src = g.weight_root(p.input[0])
        (weights if g.is_const(src) else acts).append(i)
    return weights, acts


def _out_channel_axis(g: _Graph, n, idx: int) -> int | None:
    """The axis of GEMM input ``idx`` (as the GEMM sees it) that indexes output channels."""
    if n.op_type == "Conv":
        return 0 if idx == 1 else None
    if n.op_type == "Gemm":
        if idx == 1:
            return 0 if _attr(n, "transB", 0) else 1
        return 1 if _attr(n, "transA", 0) else 0
    if n.op_type == "MatMul":
        return -1 if idx == 1 else -2
    return None


def _check_gemm(g: _Graph, n, qdq: dict, report) -> None:
    weights, acts = _gemm_roles(g, n)
    dq_of = {}
    for i in weights + acts:
        p, _, chain = g.source(n.input[i])
        f = qdq.get(id(p)) if p is not None else None
        if f is not None and f.kind == "DQ":
            dq_of[i] = (f, chain)
    if not dq_of:
        return  # a 16/32-bit GEMM
    name = f"{n.op_type}"
    w_dq = [dq_of[i][0] for i in weights if i in dq_of]
    a_dq = [dq_of[i][0] for i in acts if i in dq_of]
    for i in weights:
        if i not in dq_of:
            report("GEMM-WEIGHT-DQ", n, f"{name}: weight input {i} ({n.input[i]!r}) is not dequantized while "
                                        "another input is quantized")
    w_types = {f.qtype for f in w_dq}
    a_types = {f.qtype for f in a_dq}
    if w_types and w_types <= {"INT4"}:
        if a_dq:
            report("GEMM-MIXED-TYPES", n, f"{name}: INT4 weight with a {'/'.join(sorted(a_types))} activation "
                                          "(INT4 is weight-only: leave the activation in 16/32-bit)")
    else:
        eight = (w_types | a_types) - {"INT4"}
        missing = [i for i in acts if i not in dq_of]
        if missing:
            kind = "/".join(sorted(w_types)) or "quantized"
            report("GEMM-ACT-QDQ", n, f"{name}: {kind} GEMM with unquantized activation input(s) "
                                      f"{[n.input[i] for i in missing]} (weight-only is INT4 only)")
        if len(eight) > 1 or "INT4" in (w_types | a_types) and eight:
            report("GEMM-MIXED-TYPES", n, f"{name}: inputs of different quantized types "
                                          f"{sorted(w_types | a_types)}")
    # per-channel weight axis along output channels
    for i in weights:
        if i not in dq_of:
            continue
        f, chain = dq_of[i]
        if f.granularity != "per-channel" or f.rank is None:
            continue
        want = _out_channel_axis(g, n, i)
        if want is None:
            continue
        rank = f.rank
        ax = f.axis + rank if f.axis < 0 else f.axis
        if not 0 <= ax < rank:
            continue  # QDQ-AXIS already
        if any(c.op_type == "Reshape" for c in chain):
            continue  # axis mapping through a reshape is not checked
        # map the GEMM-side axis back through the Transposes (chain is GEMM-side first)
        want = want + rank if want < 0 else want
        for c in chain:
            if c.op_type == "Transpose":
                perm = _attr(c, "perm", list(range(rank - 1, -1, -1)))
                want = int(perm[want])
        if ax != want:
            report("QDQ-WEIGHT-AXIS", f.node, f"per-channel weight scale along axis {f.axis}, but the output "
                                              f"channels of {n.op_type} {g.name(n)!r} are axis {want}")


# ----------------------------------------------------------------------------- files
def load_model(path: str | Path):
    """``onnx.load`` without external data; InputError naming the path when it cannot be read."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable ONNX model ({msg})") from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise InputError(f"{path}: not a readable ONNX model (no graph / IR version)")
    return model


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """.onnx files as given; a build directory (``onnx/manifest.json``) or its ``onnx`` folder -> its segments."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            manifest = p / "onnx" / "manifest.json"
            if not manifest.is_file():
                manifest = p / "manifest.json"
            if not manifest.is_file():
                raise InputError(f"{p}: a directory without onnx/manifest.json (give .onnx files or a build directory)")
            out.extend(segment_files(manifest))
        else:
            out.append(p)
    return out


def segment_files(manifest_path: Path) -> list[Path]:
    """The ONNX files a lowering manifest lists (``segments[].file``, relative to the manifest)."""
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{manifest_path}: unreadable manifest ({exc})") from None
    segs = manifest.get("segments") if isinstance(manifest, dict) else None
    if not isinstance(segs, list) or not segs:
        raise InputError(f"{manifest_path}: no 'segments' list")
    files = []
    for s in segs:
        f = s.get("file") if isinstance(s, dict) else None
        if not f:
            raise InputError(f"{manifest_path}: a segment without 'file'")
        cand = Path(manifest_path).parent / f
        if not cand.exists() and (Path(manifest_path).parent.parent / f).exists():
            cand = Path(manifest_path).parent.parent / f
        files.append(cand)
    return files


def check_files(paths: Iterable[str | Path], *, target: str = "tensorrt") -> dict[str, Any]:
    """Check ONNX files (or build directories); returns a JSON-able report.

    ``{"target", "files": [{"path", "nodes", "qdq_nodes", "violations": [...]}], "errors",
    "warnings", "ok"}``. Unreadable or missing files raise :class:`InputError` with the path.
    """
    files = expand_paths(paths)
    if not files:
        raise InputError("check: no files given")
    report = {"target": target, "files": [], "errors": 0, "warnings": 0}
    for path in files:
        model = load_model(path)
        try:
            vs = check_model(model, target=target, base_dir=str(Path(path).parent))
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        for v in vs:
            v.file = str(path)
        report["files"].append({
            "path": str(path), "nodes": len(model.graph.node),
            "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node),
            "violations": [v.to_dict() for v in vs]})
        report["errors"] += sum(v.severity == "error" for v in vs)
        report["warnings"] += sum(v.severity != "error" for v in vs)
    report["ok"] = report["errors"] == 0
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for f in report["files"]:
        vs = f["violations"]
        lines.append(f"{f['path']}: {f['qdq_nodes']} Q/DQ nodes of {f['nodes']}, "
                     f"{len(vs)} violation{'s' if len(vs) != 1 else ''}")
        for v in vs:
            lines.append("  " + str(Violation(**{**v, "file": None})))
    lines.append(f"{'OK' if report['ok'] else 'FAILED'}: {report['errors']} error(s), {report['warnings']} warning(s) "
                 f"in {len(report['files'])} file(s) (target {report['target']})")
    return "\n".join(lines)


def rules_text() -> str:
    return "\n".join(f"{rid:20s} [{basis}] {text}" for rid, (basis, text) in RULES.items())


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="adatsq check", description="check Q/DQ ONNX graphs against TensorRT's explicit-quantization rules")
    p.add_argument("paths", nargs="*", metavar="FILE_OR_BUILD_DIR", help=".onnx files or build directories")
    p.add_argument("--target", default="tensorrt", choices=["tensorrt"])
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--rules", action="store_true", help="list the rules and exit")
    return p


def run(args, *, out=None) -> int:
    """Run a parsed ``adatsq check`` (see :func:`build_arg_parser`); 0 if clean, 1 if any error."""
    out = out or (lambda s: print(s))
    if args.rules:
        out(rules_text())
        return 0
    if not args.paths:
        raise InputError("check: give .onnx files or a build directory")
    report = check_files(args.paths, target=args.target)
    out(format_report(report))
    if args.json:
        from ..tools.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None, *, out=None) -> int:
    """``adatsq check FILE_OR_BUILD_DIR [...] [--json FILE]``: prints violations, returns 1 if any.

    Unreadable input raises :class:`adatsq.errors.InputError` (the CLI prints it and exits with 2).
    """
    return run(build_arg_parser().parse_args(argv), out=out)


if __name__ == "__main__":  # python -m adatsq.backends.validate
    from ..errors import AdatsqError

    try:
        sys.exit(main())
    except AdatsqError as exc:
        print(f"adatsq: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
