"""ONNX Q/DQ lowering of a precision plan: one opset-21 graph per segment of steps.

A *segment* is a maximal set of denoising steps whose layers carry the same precision assignment
(the same row of ``plan.assignment``); steps need not be contiguous. Each segment is the exported
FP32 ONNX graph (``frontend/onnx_io.export_onnx``) with every quantized layer rewritten into
TensorRT-style explicit quantization. For a layer ``y = x W^T + b`` with a weights-file base
(smoothing ``s`` and a 16-bit low-rank branch ``A B``, see ``passes/weights.LayerPrep``):

    x' = Div(x, s)                                          (only with a smoothing vector)
    xq = DequantizeLinear(QuantizeLinear(x', a, 0), a, 0)   (INT8 activations: static per-tensor
                                                             scale ``a`` of this layer on this segment)
    Wd = DequantizeLinear(codes [K, O], scales, axis, block_size)
    y  = MatMul/Gemm(xq, Wd [+ b])  +  MatMul(MatMul(x', Cast(B^T)), Cast(A^T))

* INT8 weights: int8 codes stored ``[K, O]`` (the layout MatMul consumes); per output channel
  scales ``[O]`` with ``axis=1``. A copy quantized in groups becomes a blocked DQ (``axis=0``,
  ``block_size`` = group): valid ONNX that onnxruntime runs, but TensorRT accepts blocked DQ only for
  4-bit weights, so such a copy is reported as not TensorRT-ready (make INT8 copies per channel).
* INT4 weights: ONNX ``INT4`` codes ``[K, O]`` (two per byte, low nibble first), blocked DQ with
  ``axis=0`` and ``block_size`` = group (per channel: ``axis=1``).
* Activations: symmetric INT8, zero point 0, one static scale per (layer, segment) =
  ``amax / 127`` where ``amax`` is the largest ``|x / s|`` the layer saw at the segment's steps on
  the calibration trajectories (:class:`ActivationRanges`). Per-token activation scales are not
  expressible as TensorRT explicit quantization (static scales only), so no target gets them.
* 16-bit layers (``FP16`` points) keep the exported FP32 node and weight (the CPU runs FP32; a
  TensorRT engine builder picks FP16 itself). The low-rank factors are stored in FP16 (the "16-bit
  branch") and cast to FP32.
* Gemm layers get ``transB=0`` and a ``[K, O]`` weight like MatMul layers. Conv layers (patch
  embeddings): INT8/INT4 per-output-channel DQ on the 4-D/5-D weight (``axis=0``); a conv copy
  in groups is stored dequantized in FP32 (exact values, no compression).

Every node the lowering emits (and the rewritten layer node) carries provenance in
``metadata_props``: ``adatsq.module``, ``adatsq.precision``, ``adatsq.segment``, ``adatsq.steps``.

Weights are stored once: every initializer of at least 256 bytes goes to ONE external-data file
(``weights.onnx.data``), deduplicated by content, so a tensor used by several segments (a
quantized copy, an unquantized norm, a 16-bit layer) has one offset that every segment points to.

The deployed numerics differ from the search's simulation only in the activation quantizer
(static per-tensor instead of dynamic per-token) and in the FP16 rounding of the low-rank factors;
:func:`deployed_transforms` builds the PyTorch reference of exactly what the graph computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from .manifest import FORMAT, MANIFEST, ONNX_DIR, VERSION, row_sha256, sha256_file

DATA_FILE = "weights.onnx.data"
EXTERNAL_MIN_BYTES = 256  # smaller initializers (scalar scales, zero points, shapes) stay in the graph
ALIGN = 64  # byte alignment of tensors in the data file
ACT_QMAX = 127
#: what lowering emits for a precision: (weight bits, activation bits); FP16 is (16, 16)
LOWERABLE_W = (4, 8, 16)
LOWERABLE_A = (8, 16)
#: node metadata the exporter writes that the segments do not need (stack traces are most of a
#: segment file's bytes); name scopes and namespaces are kept
#: exporter metadata a segment does not keep: stack traces and FX node dumps, and the two restatements
#: of ``pkg.torch.onnx.name_scopes`` (``namespace``, ``class_hierarchy``: 0.38 of a flux-fmnist segment's
#: 0.94 MB). Provenance stays in ``adatsq.*`` and the name scopes.
DROP_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace",
                      "pkg.torch.onnx.class_hierarchy", "pkg.onnxscript.rewriter.rule_name")


class LoweringError(InputError):
    """The plan, weights or graph cannot be lowered (unsupported precision, layer not found ...)."""


# =========================================================================== segments
@dataclasses.dataclass(frozen=True)
class Segment:
    name: str
    steps: tuple[int, ...]
    row: tuple[str, ...]  # the precision of every plan layer

    def summary(self) -> dict[str, int]:
        from collections import Counter

        return dict(sorted(Counter(self.row).items()))


def plan_segments(plan: Any) -> list[Segment]:
    """Group the plan's steps by identical assignment rows, in order of first use."""
    order: dict[tuple[str, ...], list[int]] = {}
    for k, row in enumerate(plan.assignment):
        order.setdefault(tuple(row), []).append(k)
    return [Segment(f"seg{i:02d}", tuple(steps), row) for i, (row, steps) in enumerate(order.items())]


def check_lowerable(plan: Any) -> None:
    used = {n for row in plan.assignment for n in row}
    for p in plan.lattice:
        if p.name not in used:
            continue
        if (p.fmt != "int" or p.w_bits not in LOWERABLE_W or p.a_bits not in LOWERABLE_A
                or (p.w_bits == 16 and p.a_bits != 16)):
            raise LoweringError(f"precision {p.name} (W{p.w_bits}A{p.a_bits}) has no ONNX Q/DQ lowering: the "
                                "backends run INT4/INT8 weights with INT8 or 16-bit activations, and 16-bit layers "
                                "(build with --target onnxruntime or tensorrt)")


# =========================================================================== calibration
class ActivationRanges:
    """Per layer and step, the per-input-channel ``max |x|`` of what the layer multiplies.

    Used as a context manager around forward passes; set :attr:`step` (or pass :meth:`on_step`
    as the sampler's ``on_step``) so each call is recorded at its denoising step. Linear layers:
    channels are the last dimension; convolutions: dimension 1.
    """

    def __init__(self, transformer: torch.nn.Module, params: Sequence[str], num_steps: int):
        from ..passes.capture import layer_modules

        self.mods = layer_modules(transformer, list(params))
        self.num_steps = int(num_steps)
        self.step = 0
        self.absmax: dict[str, torch.Tensor] = {}
        self.seen = torch.zeros(self.num_steps, dtype=torch.bool)
        self._handles: list = []

    def on_step(self, k: int, *_args) -> None:
        self.step = k + 1

    def _hook(self, param: str, module: torch.nn.Module):
        conv = not isinstance(module, torch.nn.Linear)

        def hook(_m, args):
            x = args[0].detach()
            if conv:
                dims = [d for d in range(x.dim()) if d != 1]
            else:
                dims = list(range(x.dim() - 1))
            am = torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg()).float().cpu() if dims else x.abs().float()
            t = self.absmax.get(param)
            if t is None:
                t = self.absmax[param] = torch.zeros(self.num_steps, am.numel())
            t[self.step] = torch.maximum(t[self.step], am.reshape(-1))
            self.seen[self.step] = True

        return hook

    def __enter__(self) -> "ActivationRanges":
        for p, m in self.mods.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(p, m)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def segment_amax(self, param: str, steps: Sequence[int], smooth: torch.Tensor | None = None) -> float:
        """``max |x / s|`` of ``param`` over ``steps`` (the static range of its activation quantizer)."""
        if param not in self.absmax:
            raise LoweringError(f"calibration: {param} never ran during calibration")
        missing = [t for t in steps if not bool(self.seen[t])]
        if missing:
            raise LoweringError(f"calibration: step {missing[0]} was never run (the calibration schedule "
                                "differs from the plan's?)")
        am = self.absmax[param][list(steps)].amax(0)
        if smooth is not None:
            am = am / smooth.float()
        return float(am.max())


def act_scale(amax: float) -> np.float32:
    """The INT8 activation scale for a static range (float32, what the graph and the reference use)."""
    return np.float32(max(float(amax), 1e-8) / ACT_QMAX)


def segment_scales(plan: Any, segments: Sequence[Segment], ranges: ActivationRanges,
                   preps: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{segment: {param: activation scale}}`` for every layer with INT8 activations there."""
    by_name = {p.name: p for p in plan.lattice}
    out: dict[str, dict[str, float]] = {}
    for seg in segments:
        sc = {}
        for i, param in enumerate(plan.layers):
            prec = by_name[seg.row[i]]
            if prec.a_bits < 16:
                pr = preps.get(param)
                sc[param] = float(act_scale(ranges.segment_amax(param, seg.steps, None if pr is None else pr.smooth)))
        out[seg.name] = sc
    return out


# =========================================================================== PyTorch reference
def fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


@dataclasses.dataclass(frozen=True)
class ConvQuant:
    """A quantized convolution in the deployed numerics: static INT activations, dequantized weight."""

    weight: torch.Tensor
    a_bits: int
    act_scale: float | None

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        from ..passes.quant import fake_quant_static

        if self.a_bits < 16:
            x = fake_quant_static(x, self.a_bits, torch.tensor(self.act_scale, dtype=torch.float32))
        return module._conv_forward(x, self.weight, module.bias)


def deployed_transforms(plan: Any, weights: Any, transformer: torch.nn.Module,
                        scales: Mapping[str, Mapping[str, float]], segments: Sequence[Segment] | None = None
                        ) -> dict[str, list]:
    """Per layer, per step: what the lowered graph computes (for :func:`deployed_layers`).

    Linear layers: a :class:`~adatsq.passes.transforms.LayerTransform` with the plan's dequantized
    copy, the layer's smoothing, its low-rank factors rounded to FP16 and the segment's static
    activation scale; convolutions: a :class:`ConvQuant`; 16-bit layers: ``None`` (the module
    as it is). One object per (layer, segment), shared by the segment's steps."""
    from ..passes.transforms import LayerTransform

    segments = list(segments or plan_segments(plan))
    seg_of = {k: s for s in segments for k in s.steps}
    params = dict(transformer.named_parameters())
    mods = dict(transformer.named_modules())
    by_name = {p.name: p for p in plan.lattice}
    out: dict[str, list] = {}
    for i, param in enumerate(plan.layers):
        if param not in params:
            raise LoweringError(f"plan: {param} is not a parameter of this model")
        mod = mods[param[: -len(".weight")]]
        prep = weights.prep(param) if weights is not None else None
        made: dict[str, Any] = {}
        steps = []
        for k in range(len(plan.assignment)):
            seg = seg_of[k]
            if seg.name not in made:
                prec = by_name[seg.row[i]]
                if prec.w_bits >= 16 and prec.a_bits >= 16:
                    made[seg.name] = None
                else:
                    if weights is None:
                        raise LoweringError(f"plan: {param} runs at {prec.name} but no weights file was given")
                    w = params[param].detach().float()
                    wq = weights.find(param, prec.w_bits).dequantize().reshape(w.shape).float()
                    sc = scales.get(seg.name, {}).get(param) if prec.a_bits < 16 else None
                    if isinstance(mod, torch.nn.Linear):
                        lr = None if prep is None or prep.low_rank is None else tuple(fp16_round(t) for t in prep.low_rank)
                        made[seg.name] = LayerTransform(
                            wq, prec.a_bits, smooth=None if prep is None else prep.smooth.float(), low_rank=lr,
                            act_scale=None if sc is None else torch.tensor(sc, dtype=torch.float32))
                    else:
                        if prep is not None:
                            raise LoweringError(f"{param}: smoothing/low-rank bases apply to Linear layers only")
                        made[seg.name] = ConvQuant(wq, prec.a_bits, sc)
            steps.append(made[seg.name])
        out[param] = steps
    return out


@contextlib.contextmanager
def deployed_layers(transformer: torch.nn.Module, transforms: Mapping[str, Sequence[Any]], clock: Any
                    ) -> Iterator[None]:
    """Within the context the model computes the deployed numerics of :func:`deployed_transforms`
    at ``clock.step`` (a :class:`~adatsq.passes.transforms.StepClock`)."""
    mods = dict(transformer.named_modules())
    patched = []
    try:
        for param, per_step in transforms.items():
            m = mods[param[: -len(".weight")]]
            per_step = tuple(per_step)
            if len(per_step) != clock.num_steps:
                raise InputError(f"{param}: {len(per_step)} per-step transforms for a {clock.num_steps}-step clock")
            if all(t is None for t in per_step):
                continue
            orig = m.forward

            def fwd(x, m=m, per_step=per_step, orig=orig):
                tr = per_step[clock.step]
                if tr is None:
                    return orig(x)
                if isinstance(tr, ConvQuant):
                    return tr(m, x)
                return tr(x, m.bias)

            m.forward = fwd
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


# =========================================================================== graph rewriting
def _onnx():
    import onnx

    return onnx


class _Emitter:
    """Collects the nodes and initializers one layer's lowering adds, with provenance."""

    def __init__(self, graph, prov: dict[str, str]):
        self.graph = graph
        self.prov = prov
        self.pre: list = []
        self.post: list = []
        self.inits: dict[str, Any] = {}

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, post: bool = False, **attrs):
        from onnx import helper

        n = helper.make_node(op, inputs, outputs, name=name, **attrs)
        stamp(n, self.prov)
        (self.post if post else self.pre).append(n)
        return n

    def init(self, name: str, array: np.ndarray | None = None, tensor=None) -> str:
        from onnx import numpy_helper

        if name not in self.inits:
            self.inits[name] = tensor if tensor is not None else numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name


def stamp(node, prov: Mapping[str, str]) -> None:
    existing = {p.key: p for p in node.metadata_props}
    for k, v in prov.items():
        if k in existing:
            existing[k].value = v
        else:
            e = node.metadata_props.add()
            e.key, e.value = k, v


def _int4_tensor(name: str, codes_kn: torch.Tensor):
    """An ONNX INT4 initializer of int8 codes ``[K, O]`` (values -8..7), packed as ONNX packs INT4."""
    from onnx import TensorProto, helper

    from ..passes.quant import pack_int4

    packed = pack_int4(codes_kn.contiguous()).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.INT4, list(codes_kn.shape), packed, raw=True)


def _weight_dq(em: _Emitter, param: str, tag: str, q: Any, kind: str, wshape: tuple[int, ...], notes: list[str]) -> str:
    """Emit the weight DequantizeLinear of copy ``q`` (QuantizedWeight); returns its output name.
    Linear: ``[K, O]`` layout; conv: the conv weight's own layout."""
    o = q.codes.shape[0]
    k = q.codes.numel() // o
    g = q.group_size
    base = f"adatsq/{param}/{tag}"
    if kind == "linear":
        codes = q.codes.reshape(o, k).t().contiguous()  # [K, O]
        if g is None or g == k:
            scale = q.scales.reshape(o).float().numpy()
            attrs = dict(axis=1)
        else:
            scale = q.scales.reshape(o, k // g).t().contiguous().float().numpy()  # [K/g, O]
            attrs = dict(axis=0, block_size=int(g))
            if q.bits > 4:
                notes.append(f"{param}: {q.bits}-bit copy in groups of {g} lowered as a blocked DQ (TensorRT takes "
                             "blocked DQ for 4-bit weights only)")
    else:  # conv: per output channel only; grouped copies stored dequantized
        if g is not None and g != k:
            w = q.dequantize().reshape(wshape).float().numpy()
            notes.append(f"{param}: conv copy in groups of {g} stored dequantized (FP32)")
            return em.init(f"{base}.dequantized", w)
        codes = q.codes.reshape(wshape).contiguous()
        scale = q.scales.reshape(o).float().numpy()
        attrs = dict(axis=0)
    wname = f"{base}.codes"
    if wname not in em.inits:
        if q.bits <= 4:
            em.init(wname, tensor=_int4_tensor(wname, codes))
        else:
            em.init(wname, codes.numpy().astype(np.int8))
    sname = em.init(f"{base}.scales", scale.astype(np.float32))
    out = f"{base}.dq"
    em.node("DequantizeLinear", [wname, sname], [out], name=f"{base}/DequantizeLinear", **attrs)
    return out


def lower_segment(base, table: Any, plan: Any, seg: Segment, weights: Any, scales: Mapping[str, float],
                  notes: list[str] | None = None):
    """The ONNX ModelProto of one segment (weights inline; :func:`write_segments` externalises them).

    ``base`` is the exported FP32 ModelProto (not modified), ``table`` its layer table
    (:func:`~adatsq.frontend.onnx_io.layer_table_from_onnx`), ``scales`` the segment's activation
    scales (param -> float)."""
    from onnx import TensorProto, helper, numpy_helper

    notes = notes if notes is not None else []
    onnx = _onnx()
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    for n in g.node:
        for key in DROP_NODE_METADATA:
            for i in reversed(range(len(n.metadata_props))):
                if n.metadata_props[i].key == key:
                    del n.metadata_props[i]
    inits = {i.name: i for i in g.initializer}
    by_node = {n.name: n for n in g.node}
    by_name = {p.name: p for p in plan.lattice}
    steps_json = json.dumps(list(seg.steps))
    before: dict[str, list] = {}
    after: dict[str, list] = {}
    new_inits: dict[str, Any] = {}
    zp_name = "adatsq/zero_point_int8"
    for i, param in enumerate(plan.layers):
        if param not in table:
            raise LoweringError(f"plan layer {param} has no node in the ONNX graph")
        info = table[param]
        prec = by_name[seg.row[i]]
        module = param[: -len(".weight")] if param.endswith(".weight") else param
        prov = {"adatsq.module": module, "adatsq.precision": prec.name, "adatsq.segment": seg.name,
                "adatsq.steps": steps_json}
        if prec.w_bits >= 16 and prec.a_bits >= 16:
            for nn in info.onnx_nodes:
                stamp(by_node[nn], prov)
            continue
        q = weights.find(param, prec.w_bits)
        prep = weights.prep(param) if info.kind == "linear" else None
        em = _Emitter(g, prov)
        tag = f"w{prec.w_bits}" + (f"g{q.group_size}" if q.group_size else "")
        wdq = _weight_dq(em, param, tag, q, info.kind, tuple(info.shape) if info.kind == "conv" else (), notes)
        for j, nn in enumerate(info.onnx_nodes):
            node = by_node[nn]
            pfx = f"adatsq/{param}/{seg.name}/{j}"
            x = node.input[0]
            if prep is not None:
                s_name = em.init(f"adatsq/{param}/smooth", prep.smooth.float().numpy())
                em.node("Div", [x, s_name], [f"{pfx}/x_smooth"], name=f"{pfx}/Div")
                x = f"{pfx}/x_smooth"
            x_lr = x
            if prec.a_bits < 16:
                if param not in scales:
                    raise LoweringError(f"{param}: no activation scale for segment {seg.name}")
                em.init(zp_name, np.array(0, dtype=np.int8))
                a_name = em.init(f"adatsq/{param}/{seg.name}/act_scale", np.array(scales[param], dtype=np.float32))
                em.node("QuantizeLinear", [x, a_name, zp_name], [f"{pfx}/x_q"], name=f"{pfx}/QuantizeLinear")
                em.node("DequantizeLinear", [f"{pfx}/x_q", a_name, zp_name], [f"{pfx}/x_dq"],
                        name=f"{pfx}/DequantizeLinear")
                x = f"{pfx}/x_dq"
            node.input[0] = x
            node.input[1] = wdq
            if node.op_type == "Gemm":
                attrs = {a.name: a for a in node.attribute}
                if "transA" in attrs and attrs["transA"].i != 0:
                    raise LoweringError(f"{param}: Gemm with transA=1 is not supported")
                for a in ("alpha", "beta"):
                    if a in attrs and attrs[a].f != 1.0:
                        raise LoweringError(f"{param}: Gemm with {a}={attrs[a].f} is not supported")
                if "transB" in attrs:
                    attrs["transB"].i = 0
            elif node.op_type != info_op(info):
                raise LoweringError(f"{param}: unexpected {node.op_type} node")
            stamp(node, prov)
            if prep is not None and prep.low_rank is not None:
                a, b = prep.low_rank
                bt = em.init(f"adatsq/{param}/low_rank_b_t", b.t().contiguous().to(torch.float16).numpy())
                at = em.init(f"adatsq/{param}/low_rank_a_t", a.t().contiguous().to(torch.float16).numpy())
                y = node.output[0]
                main = f"{pfx}/y_main"
                node.output[0] = main
                em.node("Cast", [bt], [f"{pfx}/lr_b"], name=f"{pfx}/Cast_b", to=TensorProto.FLOAT)
                em.node("Cast", [at], [f"{pfx}/lr_a"], name=f"{pfx}/Cast_a", to=TensorProto.FLOAT)
                em.node("MatMul", [x_lr, f"{pfx}/lr_b"], [f"{pfx}/lr_h"], name=f"{pfx}/MatMul_lr_b", post=True)
                em.node("MatMul", [f"{pfx}/lr_h", f"{pfx}/lr_a"], [f"{pfx}/lr_y"], name=f"{pfx}/MatMul_lr_a", post=True)
                em.node("Add", [main, f"{pfx}/lr_y"], [y], name=f"{pfx}/Add_lr", post=True)
            before.setdefault(nn, []).extend(em.pre)
            after.setdefault(nn, []).extend(em.post)
            em.pre, em.post = [], []
        new_inits.update(em.inits)
    nodes = list(g.node)
    del g.node[:]
    for n in nodes:
        g.node.extend(before.get(n.name, []))
        g.node.append(n)
        g.node.extend(after.get(n.name, []))
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    g.initializer.extend(new_inits.values())
    _set_model_props(model, {"adatsq.segment": json.dumps(dict(name=seg.name, steps=list(seg.steps),
                                                               assignment=seg.summary(),
                                                               assignment_sha256=row_sha256(seg.row)))})
    return model


def info_op(info: Any) -> str:
    return "Conv" if info.kind == "conv" else "MatMul"


def _set_model_props(model, entries: Mapping[str, str]) -> None:
    stamp(model, entries)


# =========================================================================== external data
class SharedData:
    """One external-data file for every segment: each distinct tensor stored once."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offsets: dict[bytes, tuple[int, int]] = {}
        self.size = 0
        self.tensors = 0

    def externalise(self, model) -> None:
        from onnx import TensorProto, numpy_helper

        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                raise LoweringError(f"initializer {t.name} is already external")
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            key = hashlib.blake2b(f"{t.data_type}:{list(t.dims)}".encode() + raw, digest_size=20).digest()
            if key not in self.offsets:
                pad = -self.size % ALIGN
                if pad:
                    self.f.write(b"\0" * pad)
                    self.size += pad
                self.offsets[key] = (self.size, len(raw))
                self.f.write(raw)
                self.size += len(raw)
                self.tensors += 1
            off, n = self.offsets[key]
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(field)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v

    def close(self) -> None:
        self.f.close()


def _io_spec(values) -> list[dict]:
    from onnx import TensorProto

    out = []
    for v in values:
        tt = v.type.tensor_type
        out.append(dict(name=v.name, elem_type=TensorProto.DataType.Name(tt.elem_type).lower(),
                        shape=[d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]))
    return out


# =========================================================================== whole plan
def lower_plan(base, plan: Any, weights: Any, scales: Mapping[str, Mapping[str, float]], out_dir: str | Path, *,
               target: str = "onnxruntime", plan_file: str | Path | None = None,
               extra_files: Mapping[str, str | Path] | None = None, extra: Mapping[str, Any] | None = None,
               segments: Sequence[Segment] | None = None, log: Callable[[str], None] | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Lower ``plan`` on the exported FP32 ``base`` ModelProto into ``out_dir`` (segments, shared
    data, manifest); returns the manifest. ``out_dir`` appears complete or not at all.

    ``plan_file`` (the plan.json the manifest pins, default ``out_dir/../plan.json``),
    ``extra_files`` (name -> path copied beside the segments and pinned, e.g. the conditioner),
    ``extra`` (more manifest keys, e.g. the sampling pipeline)."""
    from ..frontend.onnx_io import layer_table_from_onnx, model_metadata

    onnx = _onnx()
    out_dir = Path(out_dir)
    prog = progress or (lambda stage, done, total: None)
    check_lowerable(plan)
    segments = list(segments or plan_segments(plan))
    table = layer_table_from_onnx(base)
    meta = model_metadata(base)
    fp = meta.get("fingerprint")
    if fp is not None and fp != dataclasses.asdict(plan.model):
        raise LoweringError(f"the ONNX graph is of model {fp.get('arch')} with other weights/config than the plan's "
                            f"({plan.model.arch} {plan.model.short})")
    plan_file = Path(plan_file) if plan_file is not None else out_dir.parent / "plan.json"
    if not plan_file.is_file():
        raise LoweringError(f"{plan_file}: no such plan file (the manifest pins the plan it was lowered from)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    t0 = time.perf_counter()
    notes: list[str] = []
    try:
        data = SharedData(tmp / DATA_FILE)
        seg_entries = []
        try:
            for i, seg in enumerate(segments):
                m = lower_segment(base, table, plan, seg, weights, scales.get(seg.name, {}), notes)
                data.externalise(m)
                path = tmp / f"{seg.name}.onnx"
                onnx.save_model(m, str(path))
                seg_entries.append(dict(name=seg.name, file=path.name, steps=list(seg.steps),
                                        assignment=seg.summary(), assignment_sha256=row_sha256(seg.row),
                                        bytes=path.stat().st_size))
                del m
                prog("lowering", i + 1, len(segments))
        finally:
            data.close()
        for e in seg_entries:  # checked by path: resolves the shared external data
            try:
                onnx.checker.check_model(str(tmp / e["file"]), full_check=False)
            except Exception as exc:
                raise LoweringError(f"lowered segment {e['name']} fails onnx.checker: {str(exc).splitlines()[0]}") from None
            e["sha256"] = sha256_file(tmp / e["file"])
        files = []
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
            files.append(dict(file=name, sha256=sha256_file(tmp / name), bytes=(tmp / name).stat().st_size))
        fp32_bytes = base.ByteSize()
        seg_bytes = sum(e["bytes"] for e in seg_entries)
        manifest = dict(
            format=FORMAT, version=VERSION, target=target, opset=max(o.version for o in base.opset_import
                                                                     if o.domain in ("", "ai.onnx")),
            model=dict(dataclasses.asdict(plan.model), arch_meta=meta.get("arch"), resolution=meta.get("resolution")),
            plan=dict(file=os.path.relpath(plan_file, out_dir.parent), sha256=sha256_file(plan_file)),
            inputs=_io_spec(base.graph.input), outputs=_io_spec(base.graph.output),
            external_data=dict(file=DATA_FILE, sha256=sha256_file(tmp / DATA_FILE), bytes=data.size,
                               tensors=data.tensors),
            segments=seg_entries, steps=[next(s.name for s in segments if k in s.steps)
                                         for k in range(len(plan.assignment))],
            files=files,
            quantization=dict(activations="int8 symmetric, static per-tensor scale per (layer, segment) = amax/127",
                              weights_int8="per output channel (axis 1 of [K, O])",
                              weights_int4="blocked along K (axis 0 of [K, O], block_size = group)",
                              low_rank="fp16 factors, cast to fp32", sixteen_bit="fp32 as exported"),
            ort=dict(session_config=dict(ORT_SESSION_CONFIG)),
            sizes=dict(fp32_onnx_bytes=fp32_bytes, external_data_bytes=data.size, segments_bytes=seg_bytes,
                       total_bytes=data.size + seg_bytes,
                       ratio_to_fp32=round((data.size + seg_bytes) / max(fp32_bytes, 1), 4),
                       data_ratio_to_fp32=round(data.size / max(fp32_bytes, 1), 4)),
            notes=notes, seconds=round(time.perf_counter() - t0, 2), **dict(extra or {}))
        from ..tools.io import atomic_write_text

        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log is not None:
        s = manifest["sizes"]
        log(f"onnx: {len(segments)} segments for {len(plan.assignment)} steps, {s['total_bytes'] / 1e6:.2f} MB "
            f"({s['ratio_to_fp32']:.3f}x the FP32 ONNX's {s['fp32_onnx_bytes'] / 1e6:.2f} MB) in {out_dir}")
    return manifest


#: onnxruntime session settings that keep the lowered numerics defined (read by the runner):
#: a DQ(INT4, blocked) + MatMul pair is fused into MatMulNBits, whose default accuracy level 4
#: quantizes the activations to INT8 on the fly; level 1 computes in FP32.
ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; an existing ``out_dir`` is replaced (moved aside first)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# =========================================================================== a build directory
def calibrate_reference(ref: Any, plan: Any, params: Sequence[str], seeds_per_class: int = 1,
                        classes: Sequence[int] | None = None) -> ActivationRanges:
    """Activation ranges of a reference model (flux-fmnist) along its FP calibration trajectories
    (every class x ``seeds_per_class`` calibration seeds, both CFG passes), per plan step."""
    from ..frontend.sampling import sample
    from ..passes.calibration import reference_calibration

    calib = reference_calibration(ref, seeds_per_class=seeds_per_class, classes=classes)
    if calib.schedule.num_steps != plan.schedule.num_steps:
        raise LoweringError(f"calibration: the model's schedule has {calib.schedule.num_steps} steps, the plan "
                            f"{plan.schedule.num_steps}")
    ranges = ActivationRanges(ref.denoiser.transformer, params, plan.schedule.num_steps)
    with ranges:
        for idx in calib.batches():
            ranges.step = 0
            sample(calib.denoiser, calib.sample_conditions(idx), [calib.sample_seeds()[i] for i in idx],
                   plan.schedule, calib.guidance, record=False, on_step=ranges.on_step)
    return ranges


def lower_build(build_dir: str | Path, model: str | None = None, target: str = "onnxruntime", *,
                seeds_per_class: int = 1, base_onnx: str | Path | None = None, graph: Any = None,
                log: Callable[[str], None] | None = print,
                progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Lower ``build_dir``'s plan.json + weights.safetensors to ``build_dir/onnx`` (see the module
    docstring): export the model to ONNX, calibrate static activation scales on the reference
    model's calibration trajectories, write the segments, the shared data and the manifest (with
    the sampling pipeline: schedule, classes, conditioner) and return the manifest.

    ``model`` defaults to the build's report.json ``options.model`` (call it with the model name
    when report.json is not written yet). ``base_onnx``: an ONNX export of the same model to
    lower instead of exporting it again (its fingerprint metadata is checked against the plan).
    ``graph``: a DiTGraph of the same model at its reference resolution (``export_model``) to check
    the plan against instead of exporting it again; without ``base_onnx`` it is also the graph
    exported to ONNX, with whatever annotations its nodes carry."""
    from ..frontend.export import export_model
    from ..frontend.onnx_io import export_onnx, load_onnx
    from ..frontend.reference import load_reference
    from ..passes.plan import PrecisionPlan, fingerprint_graph
    from ..passes.weights import load_weight_copies
    from ..tools.io import read_json

    build_dir = Path(build_dir)
    if model is None:
        report = read_json(build_dir / "report.json", LoweringError, "no such file (pass the model name)")
        model = report.get("options", {}).get("model") if isinstance(report, dict) else None
        if not model:
            raise LoweringError(f"{build_dir / 'report.json'}: does not name the model")
    plan = PrecisionPlan.load(build_dir / "plan.json")
    check_lowerable(plan)
    wfile = build_dir / "weights.safetensors"
    weights = load_weight_copies(wfile) if wfile.is_file() else None
    t0 = time.perf_counter()
    ref = load_reference(model)
    res = _reference_resolution(model)
    if graph is None:
        graph = export_model(ref.denoiser.transformer, res)
    elif graph.resolution != res:
        raise LoweringError(f"lower_build: the graph given was exported at {graph.resolution}, {model}'s reference "
                            f"resolution is {res}")
    fp = fingerprint_graph(graph)
    from ..frontend.layers import LayerTable

    plan.check_model(fp, LayerTable.from_graph(graph), where=str(build_dir / "plan.json"))
    if base_onnx is not None:
        base = load_onnx(base_onnx)
    else:
        with tempfile.TemporaryDirectory(prefix=".adatsq-onnx-", dir=build_dir) as td:
            export_onnx(graph, Path(td) / "model.onnx")
            base = load_onnx(Path(td) / "model.onnx")
    if log is not None:
        log(f"onnx: exported {model} in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    segments = plan_segments(plan)
    by_name = {p.name: p for p in plan.lattice}
    act_layers = [p for i, p in enumerate(plan.layers) if any(by_name[s.row[i]].a_bits < 16 for s in segments)]
    preps = {p: weights.prep(p) for p in act_layers} if weights is not None else {}
    preps = {p: v for p, v in preps.items() if v is not None}
    scales: dict = {}
    calib_info = dict(method="amax of |x / s| per layer over the segment's steps", layers=len(act_layers))
    if act_layers:
        ranges = calibrate_reference(ref, plan, act_layers, seeds_per_class=seeds_per_class)
        scales = segment_scales(plan, segments, ranges, preps)
        calib_info.update(samples=len(ref.classes) * seeds_per_class, seeds_per_class=seeds_per_class,
                          seconds=round(time.perf_counter() - t0, 2))
        if log is not None:
            log(f"onnx: calibrated {len(act_layers)} activation ranges in {time.perf_counter() - t0:.1f}s")
    pipeline = dict(kind="flux-fmnist", model=model, classes=list(ref.classes),
                    latent_shape=list(ref.denoiser.latent_shape()), schedule=plan.schedule.to_json(),
                    conditioner="conditioner.safetensors")
    return lower_plan(base, plan, weights, scales, build_dir / ONNX_DIR, target=target,
                      plan_file=build_dir / "plan.json",
                      extra_files={"conditioner.safetensors": ref.folder / "conditioner.safetensors"},
                      extra=dict(pipeline=pipeline, calibration=dict(calib_info, scales=scales)),
                      segments=segments, log=log, progress=progress)


def _reference_resolution(model: str):
    from ..frontend.loading import REFERENCE_RESOLUTIONS

    if model not in REFERENCE_RESOLUTIONS:
        raise LoweringError(f"{model!r} is not a reference model ({', '.join(REFERENCE_RESOLUTIONS)})")
    return REFERENCE_RESOLUTIONS[model]


__all__ = ["Segment", "plan_segments", "ActivationRanges", "segment_scales", "deployed_transforms",
           "deployed_layers", "lower_segment", "lower_plan", "lower_build", "ORT_SESSION_CONFIG", "LoweringError"]
