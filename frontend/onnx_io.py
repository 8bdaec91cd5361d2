"""ONNX export of a DiTGraph and ONNX import into the same layer table.

Export runs ``torch.onnx.export(..., dynamo=True)`` on the ExportedProgram (opset >= 21), then
carries adatsq annotations into ``metadata_props`` through :func:`adatsq.passes.annotations.encode`:
each ONNX node computing a quantizable layer gets its ``adatsq.layer`` annotation, and the model
gets ``adatsq.model`` (architecture, config, resolution, input shapes) and ``adatsq.layers`` (the
layer table). Import maps MatMul/Gemm/Conv nodes with constant weights back to parameter names:
first from our own annotation, then from an initializer named ``*.weight``, then from the
exporter's ``pkg.torch.onnx.name_scopes``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import ExportError, InputError
from ..passes.annotations import decode, encode
from .architectures import param_name
from .layers import LayerInfo, LayerRef, LayerTable, _make_info, _number_blocks

log = logging.getLogger(__name__)

DEFAULT_OPSET = 21
_LAYER_OPS = ("MatMul", "Gemm", "Conv")
_PASS_THROUGH = ("Transpose", "Identity", "Cast")
_EXTERNAL_DATA_THRESHOLD = 1 << 30  # save weights beside the model above 1 GiB (protobuf caps at 2 GiB)


def export_onnx(graph: Any, path: str | Path, *, opset: int = DEFAULT_OPSET, table: LayerTable | None = None):
    """Export ``graph`` (a DiTGraph) to ``path``; returns the ONNX ModelProto (weights inline).

    The file appears only when everything succeeded (atomic write).
    """
    import torch

    if opset < 21:
        raise InputError(f"ONNX opset {opset} is too old: adatsq emits opset >= 21 (blocked INT4 Q/DQ)")
    table = table or LayerTable.from_graph(graph)
    try:
        program = torch.onnx.export(graph.program, tuple(graph.example_inputs.values()), dynamo=True,
                                    opset_version=opset, input_names=list(graph.input_names),
                                    output_names=["sample"], verbose=False)
        model = program.model_proto
    except Exception as exc:
        raise ExportError(f"ONNX export of {graph.arch} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    _attach_annotations(model, graph, table)
    save_onnx(model, path)
    return model


def _attach_annotations(model, graph, table: LayerTable) -> None:
    refs = {}
    for node in graph.graph.nodes:
        enc = encode(node.meta)
        if enc:
            refs[node.name] = enc
    for node in model.graph.node:
        fx = _fx_name(node)
        if fx in refs:
            _set_props(node.metadata_props, refs[fx])
    from ..passes.plan import fingerprint_graph

    model_meta = dict(arch=graph.arch, config=_jsonable(graph.config), resolution=dataclasses.asdict(graph.resolution),
                      inputs={k: list(v.shape) for k, v in graph.example_inputs.items()},
                      fingerprint=dataclasses.asdict(fingerprint_graph(graph)))
    _set_props(model.metadata_props, {"adatsq.model": json.dumps(model_meta, sort_keys=True),
                                      "adatsq.layers": json.dumps(table.to_json())})


def _set_props(props, entries: dict[str, str]) -> None:
    existing = {p.key: p for p in props}
    for k, v in entries.items():
        if k in existing:
            existing[k].value = v
        else:
            e = props.add()
            e.key, e.value = k, v


def _jsonable(config) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(config).items()}, default=lambda o: list(o)
                                 if isinstance(o, (tuple, set)) else str(o)))


def save_onnx(model, path: str | Path) -> None:
    """Save atomically; above 1 GiB of weights they go to ``<name>.data`` beside the model.

    Both files are written in a temporary folder beside the target and renamed into place only
    after the whole save succeeded (data first, then the model that refers to it).
    """
    import shutil
    import tempfile

    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if weight_bytes > _EXTERNAL_DATA_THRESHOLD:
            data = path.name + ".data"
            onnx.save_model(model, str(tmpdir / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data)
            os.replace(tmpdir / data, path.parent / data)
        else:
            onnx.save_model(model, str(tmpdir / path.name))
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def load_onnx(path: str | Path, *, load_weights: bool = True):
    """Load and check an ONNX file; a missing, truncated or corrupt file is an InputError.

    With ``load_weights=False`` external weight data is not read (the layer table needs only
    initializer shapes, which are in the model file itself).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise InputError(f"{path}: ONNX model has an empty graph (truncated or not an ONNX file)")
    try:
        onnx.checker.check_model(str(path))  # by path: works with external data and > 2 GiB models
    except Exception as exc:
        raise InputError(f"{path}: invalid ONNX model ({str(exc).splitlines()[0]})") from None
    return model


def model_metadata(model) -> dict[str, Any]:
    """``adatsq.model`` metadata of an ONNX model written by adatsq ({} for foreign models)."""
    for p in model.metadata_props:
        if p.key == "adatsq.model":
            return json.loads(p.value)
    return {}


def _name_scopes(node) -> list[str]:
    """torch.onnx's ``pkg.torch.onnx.name_scopes`` of a node: module paths, then the fx node name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(json.loads(p.value.replace("'", '"')))
            except json.JSONDecodeError:
                return []
    return []


def _fx_name(node) -> str | None:
    """The fx node an ONNX node came from (the innermost name scope)."""
    scopes = _name_scopes(node)
    return scopes[-1] if scopes else None


def _module_scope(node) -> str | None:
    """The module path of the op (the scope around the fx node)."""
    scopes = _name_scopes(node)
    return scopes[-2] if len(scopes) >= 2 else None


def layer_table_from_onnx(model: Any) -> LayerTable:
    """The quantizable-layer table of an ONNX model (ModelProto or path)."""
    if isinstance(model, (str, Path)):
        model = load_onnx(model, load_weights=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def const_source(name: str):
        """(initializer, transposed) behind a tensor name, following Transpose/Identity/Cast."""
        transposed = False
        seen = 0
        while name not in inits and seen < 8:
            prod = producers.get(name)
            if prod is None or prod.op_type not in _PASS_THROUGH:
                return None, False
            if prod.op_type == "Transpose":
                transposed = not transposed
            name, seen = prod.input[0], seen + 1
        return (inits.get(name), transposed)

    per_param: "OrderedDict[str, dict]" = OrderedDict()
    for node in g.node:
        if node.op_type not in _LAYER_OPS or len(node.input) < 2:
            continue
        init, transposed = const_source(node.input[1])
        if init is None:
            continue
        dims = list(init.dims)
        if node.op_type in ("MatMul", "Gemm") and len(dims) != 2:
            continue
        try:
            ann = decode({p.key: p.value for p in node.metadata_props}).get(LayerRef.KEY)
        except ValueError as exc:
            raise InputError(f"ONNX node {node.name}: {exc}") from None
        if ann is not None:
            param = ann.param
        elif init.name.endswith(".weight"):
            param = param_name(init.name)
        elif _module_scope(node):
            param = param_name(_module_scope(node)) + ".weight"
        else:
            param = init.name
        if node.op_type == "Conv":
            kind, shape = "conv", dims
            bias = len(node.input) > 2 and bool(node.input[2])
        else:
            kind = "linear"
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute) if node.op_type == "Gemm" else False
            kn = dims[::-1] if transposed else dims  # effective B as given to the op
            out_in = kn if trans_b else kn[::-1]  # torch convention [out, in]
            shape = out_in
            if node.op_type == "Gemm":
                bias = len(node.input) > 2 and bool(node.input[2])
            else:
                bias = any(c.op_type == "Add" and any(i in inits and len(inits[i].dims) == 1 for i in c.input)
                           for c in consumers.get(node.output[0], []))
        e = per_param.setdefault(param, dict(kind=kind, shape=tuple(shape), bias=bias, onnx=[], fx=[],
                                             block_index=None if ann is None else ann.block_index))
        e["onnx"].append(node.name)
        if _fx_name(node):
            e["fx"].append(_fx_name(node))

    meta_table = None
    for p in model.metadata_props:
        if p.key == "adatsq.layers":
            meta_table = LayerTable.from_json(json.loads(p.value), where="ONNX metadata adatsq.layers")
    meta = model_metadata(model)
    infos = []
    for param, e in per_param.items():
        tokens = meta_table[param].tokens if meta_table is not None and param in meta_table else None
        infos.append(_make_info(param, e["kind"], e["shape"], e["bias"], tokens, len(e["onnx"]),
                                fx_nodes=e["fx"], onnx_nodes=e["onnx"]))
    infos = _number_blocks(infos)
    table = LayerTable(meta.get("arch", "unknown"), "onnx", OrderedDict((i.param, i) for i in infos),
                       meta.get("resolution"))
    if meta_table is not None:
        diffs = table.same_layers(meta_table)
        if diffs:
            raise InputError(f"ONNX graph disagrees with its own adatsq.layers metadata: {diffs[0]}")
    return table


__all__ = ["export_onnx", "load_onnx", "save_onnx", "layer_table_from_onnx", "model_metadata", "LayerInfo"]
