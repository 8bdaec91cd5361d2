"""Weight optimisation: a quantized copy of every layer's weight for every precision it may use.

:class:`GPTQWeights` is the pass between the search and the backends. Given the precisions each
layer may run at (a layer that switches precision across steps needs one copy per precision), it
quantizes the layer's weight with GPTQ (:mod:`adatsq.passes.gptq`) under a Hessian from the
analysis passes' ``adatsq.hessian`` annotations:

* ``fisher``: AdaTSQ's Fisher-weighted ``H' = sum_t alpha[t] X_t^T X_t`` (slot 1 of the
  ``weighted`` Hessians);
* ``uniform``: the plain ``sum_t X_t^T X_t`` (slot 0), i.e. standard GPTQ;
* ``none``: round to nearest (no Hessian needed).

Streaming: layers are processed one at a time, in graph order; each layer's Hessian is read from
the analysis cache when its turn comes and dropped after, and its codes and scales go straight to
the output file (:func:`~adatsq.tools.io.stream_safetensors`). Peak memory is one layer's Hessian
and weight copies, whatever the model size. The file appears only when every layer is done.

File format (``weights.safetensors``, loaded with :func:`load_weight_copies`): per copy,
``<param>@w<bits>[g<group>].codes`` (int8 codes ``[O, K]``; for 4 bits and fewer, uint8 with two
codes per byte, low nibble first, as ONNX packs INT4) and ``...scales`` (float32 ``[O, K/g]``,
``[O, 1]`` per output channel), with the index in the header metadata (``adatsq.weights``: JSON).
Each copy dequantizes exactly to the reference numerics of :mod:`adatsq.passes.quant`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..errors import InputError
from .annotations import annotate, get_annotation, register_annotation
from .gptq import GPTQOptions, gptq, weighted_error
from .infra import Pass, PassResult, PreconditionError
from .quant import QuantizedWeight, pack_int4, quantize_weight, unpack_int4

HESSIANS = ("fisher", "uniform", "none")
FORMAT = "adatsq.weights"


def copy_name(param: str, bits: int, group_size: int | None) -> str:
    return f"{param}@w{bits}" + (f"g{group_size}" if group_size else "")


@register_annotation("adatsq.weights")
@dataclasses.dataclass(frozen=True)
class WeightCopies:
    """On every call node of a layer: the quantized copies of its weight in a weights file."""

    param: str
    file: str
    copies: tuple[str, ...]  # copy names (see :func:`copy_name`)
    hessian: str
    # per copy: relative output error tr(dW H dW^T) / tr(W H W^T) under the uniform Hessian, for
    # RTN and for the copy written (NaN where the layer has no Hessian)
    rtn_error: tuple[float, ...]
    error: tuple[float, ...]


def _packed(bits: int) -> bool:
    return bits <= 4


def _code_spec(shape: tuple[int, int], bits: int) -> tuple[torch.dtype, tuple[int, ...]]:
    n = shape[0] * shape[1]
    return (torch.uint8, ((n + 1) // 2,)) if _packed(bits) else (torch.int8, shape)


class GPTQWeights(Pass):
    """Quantize every requested (layer, bits, group) copy and stream them to ``path``.

    ``requests`` maps a layer's weight parameter name to the (bits, group_size) pairs it needs.
    Layers need ``adatsq.hessian`` annotations (``weighted`` mode) unless ``hessian="none"``.
    """

    kind = "analysis"  # the graph is unchanged; weights go to the file, annotations to the nodes

    def __init__(self, transformer: torch.nn.Module, requests: Mapping[str, Iterable[tuple[int, int | None]]],
                 path: str | Path, hessian: str = "fisher", options: GPTQOptions = GPTQOptions(),
                 progress: Callable[[str, int, int], None] | None = None):
        if hessian not in HESSIANS:
            raise InputError(f"weights: unknown Hessian {hessian!r} (known: {', '.join(HESSIANS)})")
        options.validate()
        self.transformer = transformer
        self.requests = {p: tuple(dict.fromkeys((int(b), g) for b, g in v)) for p, v in requests.items()}
        self.path = Path(path)
        self.hessian = hessian
        self.options = options
        self.progress = progress or (lambda stage, done, total: None)
        self.seconds = 0.0
        params = dict(transformer.named_parameters())
        for p, copies in self.requests.items():  # bad requests fail here, before any work
            if p not in params:
                raise InputError(f"weights: {p} is not a parameter of the model")
            k = params[p].reshape(params[p].shape[0], -1).shape[1]
            for bits, group in copies:
                if not 2 <= bits <= 8:
                    raise InputError(f"weights: {p}: {bits}-bit copies are not integer-quantizable (2..8)")
                if group is not None and (group <= 0 or k % group):
                    raise InputError(f"weights: {p}: group size {group} does not divide its {k} inputs")

    def requires(self, graph: Any) -> None:
        from .analysis import HessianRef, layer_nodes

        nodes = layer_nodes(graph)
        for p in self.requests:
            if p not in nodes:
                raise PreconditionError(f"{self.name}: {p} is not a layer of this graph")
            if self.hessian != "none":
                h = get_annotation(nodes[p][0], HessianRef)
                if h is None:
                    raise PreconditionError(f"{self.name}: {p} has no Hessian (run the statistics pass with "
                                            f"hessian='weighted', or use hessian='none')")
                if h.mode != "weighted":
                    raise PreconditionError(f"{self.name}: {p}: needs 'weighted' Hessians, got {h.mode!r}")

    def _layer_copies(self, graph: Any) -> Iterator[tuple[str, torch.Tensor]]:
        from .analysis import HessianRef, layer_nodes

        nodes = layer_nodes(graph)
        params = dict(self.transformer.named_parameters())
        total = sum(len(v) for v in self.requests.values())
        done = 0
        self._errors: dict[str, tuple[list[float], list[float]]] = {}
        for p in (q for q in nodes if q in self.requests):  # graph order
            w = params[p].detach().float().reshape(params[p].shape[0], -1)
            if not torch.isfinite(w).all():
                raise InputError(f"weights: {p} has NaN/Inf weights")
            ref = get_annotation(nodes[p][0], HessianRef)
            sums = ref.sums() if ref is not None else None  # this layer's Hessians only
            hu = sums[0] / max(ref.counts[0], 1e-30) if sums is not None else None
            hq = None
            if self.hessian == "fisher":
                hq = sums[1] / max(ref.counts[1], 1e-30)
            elif self.hessian == "uniform":
                hq = hu
            norm = weighted_error(w, torch.zeros_like(w), hu) if hu is not None else float("nan")
            rtn_err, err = [], []
            for bits, group in self.requests[p]:
                rtn = quantize_weight(w, bits, group)
                try:
                    q = rtn if hq is None else gptq(w, hq, bits, group, self.options)
                except ValueError as exc:
                    raise InputError(f"weights: {p} at {bits} bits: {exc}") from None
                if hu is not None:
                    rtn_err.append(weighted_error(w, rtn.dequantize(), hu) / max(norm, 1e-30))
                    err.append(weighted_error(w, q.dequantize(), hu) / max(norm, 1e-30))
                else:
                    rtn_err.append(float("nan"))
                    err.append(float("nan"))
                name = copy_name(p, bits, group)
                yield f"{name}.codes", pack_int4(q.codes) if _packed(bits) else q.codes.contiguous()
                yield f"{name}.scales", q.scales.float().contiguous()
                done += 1
                self.progress("weights", done, total)
            self._errors[p] = (rtn_err, err)
            del sums, hu, hq

    def call(self, graph: Any) -> PassResult:
        from ..tools.io import stream_safetensors
        from .analysis import layer_nodes

        t0 = time.perf_counter()
        params = dict(self.transformer.named_parameters())
        nodes = layer_nodes(graph)
        specs, index = [], []
        for p in (q for q in nodes if q in self.requests):
            o, k = params[p].shape[0], params[p].reshape(params[p].shape[0], -1).shape[1]
            for bits, group in self.requests[p]:
                name = copy_name(p, bits, group)
                dtype, shape = _code_spec((o, k), bits)
                specs.append((f"{name}.codes", dtype, shape))
                specs.append((f"{name}.scales", torch.float32, (o, 1 if group is None else k // group)))
                index.append(dict(name=name, param=p, bits=bits, group_size=group, shape=[o, k],
                                  weight_shape=list(params[p].shape), packed=_packed(bits)))
        meta = {FORMAT: json.dumps(dict(version=1, hessian=self.hessian, copies=index,
                                        gptq=dataclasses.asdict(self.options)))}
        stream_safetensors(self.path, specs, self._layer_copies(graph), meta)
        for p, (rtn_err, err) in self._errors.items():
            value = WeightCopies(p, str(self.path), tuple(copy_name(p, b, g) for b, g in self.requests[p]),
                                 self.hessian, tuple(rtn_err), tuple(err))
            for node in nodes[p]:
                annotate(node, value)
        self.seconds = time.perf_counter() - t0
        return PassResult(graph, modified=False)


@dataclasses.dataclass(frozen=True)
class WeightCopyIndex:
    """A weights file, opened lazily: ``get(param, bits, group)`` reads one copy."""

    path: Path
    hessian: str
    copies: dict[tuple[str, int, int | None], dict]

    def get(self, param: str, bits: int, group_size: int | None = None) -> QuantizedWeight:
        from safetensors import safe_open

        entry = self.copies.get((param, bits, group_size))
        if entry is None:
            raise InputError(f"{self.path}: no {bits}-bit copy of {param}"
                             + (f" in groups of {group_size}" if group_size else "") + " in this file")
        with safe_open(str(self.path), framework="pt") as f:
            codes = f.get_tensor(f"{entry['name']}.codes")
            scales = f.get_tensor(f"{entry['name']}.scales")
        shape = tuple(entry["shape"])
        codes = unpack_int4(codes, shape) if entry["packed"] else codes
        return QuantizedWeight(codes, scales, bits, group_size, tuple(entry["weight_shape"]))


def load_weight_copies(path: str | Path) -> WeightCopyIndex:
    """Open a weights file written by :class:`GPTQWeights` (safetensors + JSON only)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
    if FORMAT not in meta:
        raise InputError(f"{path}: not an adatsq weights file (no '{FORMAT}' metadata)")
    try:
        info = json.loads(meta[FORMAT])
        copies = {(c["param"], int(c["bits"]), c["group_size"]): c for c in info["copies"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: malformed '{FORMAT}' metadata ({exc})") from None
    return WeightCopyIndex(path, info.get("hessian", "?"), copies)


def plan_transforms(plan: Any, weights: WeightCopyIndex | None, transformer: torch.nn.Module) -> dict[str, list]:
    """Per layer, the :class:`~adatsq.passes.transforms.LayerTransform` of every step of ``plan``,
    with the weight copies of ``weights`` (16-bit weights: the model's own); one object per
    (layer, precision), shared by the steps that use it. Run with a StepClock."""
    from .transforms import LayerTransform

    params = dict(transformer.named_parameters())
    by_name = {p.name: p for p in plan.lattice}
    out: dict[str, list] = {}
    for i, param in enumerate(plan.layers):
        if param not in params:
            raise InputError(f"plan: {param} is not a parameter of this model")
        made: dict[str, Any] = {}
        steps = []
        for row in plan.assignment:
            prec = by_name[row[i]]
            if prec.name not in made:
                w = params[param].detach().float()
                if prec.w_bits < 16:
                    if weights is None:
                        raise InputError(f"plan: {param} runs at {prec.name} but no weights file was given")
                    w = weights.get(param, prec.w_bits).dequantize().reshape(w.shape).to(w.dtype)
                made[prec.name] = LayerTransform(w, prec.a_bits)
            steps.append(made[prec.name])
        out[param] = steps
    return out
