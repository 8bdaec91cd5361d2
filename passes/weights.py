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
NVFP4 copies (``fmt`` in the index) are ``<param>@nvfp4``: E2M1 nibbles (sign in bit 3), two per
byte, and float32 scales ``[O, K/16]`` holding half of each block's scale (see
:class:`~adatsq.passes.quant.QuantizedWeight`).
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
from .quant import QuantizedWeight, nvfp4_block, pack_fp4, pack_int4, quantize_weight, unpack_fp4, unpack_int4

HESSIANS = ("fisher", "uniform", "none")
FORMAT = "adatsq.weights"


def copy_name(param: str, bits: int, group_size: int | None, fmt: str = "int") -> str:
    if fmt != "int":
        return f"{param}@{fmt}"
    return f"{param}@w{bits}" + (f"g{group_size}" if group_size else "")


def copy_key(param: str, bits: int, group_size: int | None, fmt: str = "int") -> tuple[str, int, int | None, str]:
    """How a weight copy is keyed (requests, precomputed copies, the file's index)."""
    return param, int(bits), group_size, fmt


def _request(item: tuple, k: int | None = None) -> tuple[int, int | None, str]:
    """A copy request, ``(bits, group)`` or ``(bits, group, fmt)`` -> ``(bits, group, fmt)``; an
    NVFP4 copy's group is its block (:func:`~adatsq.passes.quant.nvfp4_block` of the ``k`` inputs)."""
    bits, group, fmt = (*item, "int") if len(item) == 2 else item
    if fmt == "nvfp4" and group is None and k is not None:
        try:
            group = nvfp4_block(k)
        except ValueError:
            pass  # reported with the layer's name by GPTQWeights
    return int(bits), group, fmt


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


@dataclasses.dataclass(frozen=True)
class LayerPrep:
    """What one layer shares across every precision it runs at (AdaTSQ on an SVDQuant-style base):
    a per-input-channel smoothing ``s`` [K] and a 16-bit low-rank branch ``A`` [O, r] ``B`` [r, K]
    of the smoothed weight. The quantized copies are then copies of the residual
    ``(W * s) - A B``; at run time ``y = Q_a(x / s) Q_w(residual)^T + ((x / s) B^T) A^T + b``
    (:class:`~adatsq.passes.transforms.LayerTransform`). Sharing them keeps a layer that switches
    precision across steps to one smoothing vector (folded into its producer) and one branch."""

    smooth: torch.Tensor
    low_rank: tuple[torch.Tensor, torch.Tensor] | None

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        r = w.float() * self.smooth[None, :]
        if self.low_rank is not None:
            a, b = self.low_rank
            r = (r.double() - a.double() @ b.double()).float()
        return r

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """The Hessian of the smoothed inputs ``x / s``: ``H / (s s^T)``."""
        s = self.smooth.double()
        return h / s[:, None] / s[None, :]

    def transform(self, weight: torch.Tensor, a_bits: int, a_fmt: str = "int"):
        from .transforms import LayerTransform

        return LayerTransform(weight, a_bits, smooth=self.smooth, low_rank=self.low_rank, a_fmt=a_fmt)


def prepare_layers(calib: Any, latents: torch.Tensor, layers: Iterable[str], w_bits: int, a_bits: int,
                   rank: int = 32, samples: int = 4,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, LayerPrep]:
    """A :class:`LayerPrep` for every Linear in ``layers``: SmoothQuant-style ``alpha`` searched
    per layer on calibration rows (``samples`` samples replayed at the first, middle and last step
    of the FP trajectory ``latents``) at ``w_bits``/``a_bits`` with RTN weights, then the top
    ``rank`` singular directions of the smoothed weight kept in 16-bit."""
    from .analysis import replay_inputs
    from .transforms import low_rank_split, search_smoothing, transformed_weight

    layers = list(layers)
    transformer = calib.denoiser.transformer
    params = dict(transformer.named_parameters())
    missing = [p for p in layers if p not in params]
    if missing:
        raise InputError(f"prepare: {missing[0]} is not a parameter of the model")
    if rank < 0:
        raise InputError(f"prepare: the low-rank branch needs rank >= 0, got {rank}")
    steps = sorted({0, calib.num_steps // 2, calib.num_steps - 1})
    idx = range(min(samples, calib.num_samples))
    rows: dict[str, list[torch.Tensor]] = {p: [] for p in layers}
    for i, t in enumerate(steps):
        for p, x in replay_inputs(calib, latents, t, layers, samples=idx).items():
            rows[p].append(x.float())
        if progress is not None:
            progress("calibration rows", i + 1, len(steps))
    out = {}
    for i, p in enumerate(layers):
        w = params[p].detach().float()
        _, sm, _ = search_smoothing(torch.cat(rows.pop(p)), w, w_bits, a_bits)
        lr = None
        if rank > 0:
            a, b, _ = low_rank_split(transformed_weight(w, sm), rank)
            lr = (a, b)
        out[p] = LayerPrep(sm, lr)
        if progress is not None:
            progress("smoothing + low rank", i + 1, len(layers))
    return out


def mix_hessians(uniform: torch.Tensor, fisher: torch.Tensor, mix: float) -> torch.Tensor:
    """``(1 - mix) E_uniform[x x^T] + mix E_fisher[x x^T]``: the temporal Fisher weighting
    tempered towards the uniform average over steps (``mix`` 1: the paper's ``H'``; 0: plain GPTQ).
    Both are per-token second moments, so the mix weights step ``t`` by
    ``(1 - mix) / S + mix alpha[t]``."""
    if mix >= 1.0:
        return fisher
    if mix <= 0.0:
        return uniform
    return (1.0 - mix) * uniform + mix * fisher


def _packed(bits: int) -> bool:
    return bits <= 4


def _code_spec(shape: tuple[int, int], bits: int) -> tuple[torch.dtype, tuple[int, ...]]:
    n = shape[0] * shape[1]
    return (torch.uint8, ((n + 1) // 2,)) if _packed(bits) else (torch.int8, shape)


class GPTQWeights(Pass):
    """Quantize every requested (layer, bits, group[, format]) copy and stream them to ``path``.

    ``requests`` maps a layer's weight parameter name to the (bits, group_size) pairs it needs, or
    (bits, group_size, fmt) triples for another number format than integers (``"nvfp4"``).
    Layers need ``adatsq.hessian`` annotations (``weighted`` mode) unless ``hessian="none"``.
    """

    kind = "analysis"  # the graph is unchanged; weights go to the file, annotations to the nodes

    def __init__(self, transformer: torch.nn.Module, requests: Mapping[str, Iterable[tuple[int, int | None]]],
                 path: str | Path, hessian: str = "fisher", options: GPTQOptions = GPTQOptions(),
                 progress: Callable[[str, int, int], None] | None = None,
                 prep: Mapping[str, LayerPrep] | None = None,
                 precomputed: Mapping[tuple[str, int, int | None, str], QuantizedWeight] | None = None,
                 fisher_mix: float = 1.0):
        if hessian not in HESSIANS:
            raise InputError(f"weights: unknown Hessian {hessian!r} (known: {', '.join(HESSIANS)})")
        if not 0.0 <= fisher_mix <= 1.0:
            raise InputError(f"weights: the Fisher mix must lie in [0, 1], got {fisher_mix}")
        # hessian "fisher": H = (1 - mix) E_uniform[x x^T] + mix E_fisher[x x^T] (mix 1: the paper's H')
        self.fisher_mix = float(fisher_mix)
        options.validate()
        self.transformer = transformer
        params = dict(transformer.named_parameters())
        k_of = {p: params[p].reshape(params[p].shape[0], -1).shape[1] for p in requests if p in params}
        self.requests = {p: tuple(dict.fromkeys(_request(tuple(r), k_of.get(p)) for r in v))
                         for p, v in requests.items()}
        self.path = Path(path)
        self.hessian = hessian
        self.options = options
        self.progress = progress or (lambda stage, done, total: None)
        self.seconds = 0.0
        # per layer: smoothing + low-rank branch shared by its copies (the copies quantize the residual)
        self.prep = {p: v for p, v in (prep or {}).items() if p in self.requests}
        # copies already computed with the same Hessian and options (e.g. by the search): reused as they are
        # keyed by copy_key; (param, bits, group) keys name integer copies
        self.precomputed = {copy_key(*k): q for k, q in (precomputed or {}).items()}
        for p, copies in self.requests.items():  # bad requests fail here, before any work
            if p not in params:
                raise InputError(f"weights: {p} is not a parameter of the model")
            k = params[p].reshape(params[p].shape[0], -1).shape[1]
            pr = self.prep.get(p)
            if pr is not None and (pr.smooth.shape != (k,) or (pr.low_rank is not None and (
                    pr.low_rank[0].shape[0] != params[p].shape[0] or pr.low_rank[1].shape[1] != k))):
                raise InputError(f"weights: {p}: smoothing / low-rank shapes do not fit its {tuple(params[p].shape)} weight")
            for bits, group, fmt in copies:
                if fmt not in ("int", "nvfp4"):
                    raise InputError(f"weights: {p}: unknown number format {fmt!r} (known: int, nvfp4)")
                if fmt == "nvfp4":
                    try:
                        block = nvfp4_block(k)
                    except ValueError as exc:
                        raise InputError(f"weights: {p}: {exc}") from None
                    if bits != 4 or group != block:
                        raise InputError(f"weights: {p}: NVFP4 copies are 4-bit in blocks of {block}, "
                                         f"not {bits}-bit in groups of {group}")
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
                hq = mix_hessians(hu, sums[1] / max(ref.counts[1], 1e-30), self.fisher_mix)
            elif self.hessian == "uniform":
                hq = hu
            norm = weighted_error(w, torch.zeros_like(w), hu) if hu is not None else float("nan")
            pr = self.prep.get(p)
            wq = w
            if pr is not None:  # the copies quantize the residual of the smoothed weight, in x / s units
                yield f"{p}.smooth", pr.smooth.float().contiguous()
                if pr.low_rank is not None:
                    yield f"{p}.low_rank_a", pr.low_rank[0].float().contiguous()
                    yield f"{p}.low_rank_b", pr.low_rank[1].float().contiguous()
                wq = pr.residual(w)
                hu = pr.hessian(hu) if hu is not None else None
                hq = pr.hessian(hq) if hq is not None else None
            rtn_err, err = [], []
            for bits, group, fmt in self.requests[p]:
                try:
                    rtn = quantize_weight(wq, bits, group, fmt=fmt)
                    q = self.precomputed.get(copy_key(p, bits, group, fmt))
                    if q is None:
                        q = rtn if hq is None else gptq(wq, hq, bits, group, self.options, fmt=fmt)
                except ValueError as exc:
                    raise InputError(f"weights: {p} at {bits} bits ({fmt}): {exc}") from None
                if hu is not None:
                    rtn_err.append(weighted_error(wq, rtn.dequantize(), hu) / max(norm, 1e-30))
                    err.append(weighted_error(wq, q.dequantize().reshape(wq.shape), hu) / max(norm, 1e-30))
                else:
                    rtn_err.append(float("nan"))
                    err.append(float("nan"))
                name = copy_name(p, bits, group, fmt)
                packer = pack_fp4 if fmt == "nvfp4" else pack_int4
                yield f"{name}.codes", packer(q.codes) if _packed(bits) else q.codes.contiguous()
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
        specs, index, preps = [], [], []
        for p in (q for q in nodes if q in self.requests):
            o, k = params[p].shape[0], params[p].reshape(params[p].shape[0], -1).shape[1]
            pr = self.prep.get(p)
            if pr is not None:
                specs.append((f"{p}.smooth", torch.float32, (k,)))
                entry = dict(param=p, smooth=f"{p}.smooth", low_rank=None, rank=0)
                if pr.low_rank is not None:
                    r = pr.low_rank[0].shape[1]
                    specs.append((f"{p}.low_rank_a", torch.float32, (o, r)))
                    specs.append((f"{p}.low_rank_b", torch.float32, (r, k)))
                    entry.update(low_rank=[f"{p}.low_rank_a", f"{p}.low_rank_b"], rank=r)
                preps.append(entry)
            for bits, group, fmt in self.requests[p]:
                name = copy_name(p, bits, group, fmt)
                dtype, shape = _code_spec((o, k), bits)
                specs.append((f"{name}.codes", dtype, shape))
                specs.append((f"{name}.scales", torch.float32, (o, 1 if group is None else k // group)))
                index.append(dict(name=name, param=p, bits=bits, group_size=group, shape=[o, k],
                                  weight_shape=list(params[p].shape), packed=_packed(bits),
                                  **({} if fmt == "int" else dict(fmt=fmt))))
        meta = {FORMAT: json.dumps(dict(version=1, hessian=self.hessian, fisher_mix=self.fisher_mix,
                                        copies=index, preps=preps,
                                        gptq=dataclasses.asdict(self.options)))}
        stream_safetensors(self.path, specs, self._layer_copies(graph), meta)
        for p, (rtn_err, err) in self._errors.items():
            value = WeightCopies(p, str(self.path), tuple(copy_name(p, *r) for r in self.requests[p]),
                                 self.hessian, tuple(rtn_err), tuple(err))
            for node in nodes[p]:
                annotate(node, value)
        self.seconds = time.perf_counter() - t0
        return PassResult(graph, modified=False)


@dataclasses.dataclass(frozen=True)
class WeightCopyIndex:
    """A weights file, opened lazily: ``get(param, bits, group, fmt)`` reads one copy."""

    path: Path
    hessian: str
    copies: dict[tuple[str, int, int | None, str], dict]  # copy_key -> index entry
    preps: dict[str, dict] = dataclasses.field(default_factory=dict)

    def prep(self, param: str) -> LayerPrep | None:
        """The layer's smoothing and low-rank branch, if its copies are of a residual."""
        from safetensors import safe_open

        entry = self.preps.get(param)
        if entry is None:
            return None
        with safe_open(str(self.path), framework="pt") as f:
            sm = f.get_tensor(entry["smooth"])
            lr = tuple(f.get_tensor(n) for n in entry["low_rank"]) if entry.get("low_rank") else None
        return LayerPrep(sm, lr)

    def find(self, param: str, bits: int, fmt: str = "int") -> QuantizedWeight:
        """The ``bits``-bit copy of ``param`` in format ``fmt``, whatever its group size (a plan
        names bits and format only)."""
        groups = [g for (p, b, g, f) in self.copies if p == param and b == bits and f == fmt]
        if not groups:
            what = "NVFP4" if fmt == "nvfp4" else f"{bits}-bit"
            raise InputError(f"{self.path}: no {what} copy of {param} in this file")
        return self.get(param, bits, groups[0], fmt)

    def get(self, param: str, bits: int, group_size: int | None = None, fmt: str = "int") -> QuantizedWeight:
        from safetensors import safe_open

        entry = self.copies.get(copy_key(param, bits, group_size, fmt))
        if entry is None:
            raise InputError(f"{self.path}: no {'NVFP4' if fmt == 'nvfp4' else f'{bits}-bit'} copy of {param}"
                             + (f" in groups of {group_size}" if group_size else "") + " in this file")
        with safe_open(str(self.path), framework="pt") as f:
            codes = f.get_tensor(f"{entry['name']}.codes")
            scales = f.get_tensor(f"{entry['name']}.scales")
        shape = tuple(entry["shape"])
        unpack = unpack_fp4 if fmt == "nvfp4" else unpack_int4
        codes = unpack(codes, shape) if entry["packed"] else codes
        return QuantizedWeight(codes, scales, bits, group_size, tuple(entry["weight_shape"]), fmt)


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
        copies = {copy_key(c["param"], c["bits"], c["group_size"], c.get("fmt", "int")): c for c in info["copies"]}
        preps = {e["param"]: e for e in info.get("preps", [])}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: malformed '{FORMAT}' metadata ({exc})") from None
    return WeightCopyIndex(path, info.get("hessian", "?"), copies, preps)


def plan_transforms(plan: Any, weights: WeightCopyIndex | None, transformer: torch.nn.Module) -> dict[str, list]:
    """Per layer, the :class:`~adatsq.passes.transforms.LayerTransform` of every step of ``plan``,
    with the weight copies of ``weights`` (16-bit weights: the model's own; a layer with a
    :class:`LayerPrep` in the file runs its smoothing and low-rank branch with its quantized
    residual); one object per (layer, precision), shared by the steps that use it. Run with a
    StepClock."""
    from .transforms import LayerTransform

    params = dict(transformer.named_parameters())
    by_name = {p.name: p for p in plan.lattice}
    out: dict[str, list] = {}
    for i, param in enumerate(plan.layers):
        if param not in params:
            raise InputError(f"plan: {param} is not a parameter of this model")
        made: dict[str, Any] = {}
        steps = []
        prep = weights.prep(param) if weights is not None else None
        for row in plan.assignment:
            prec = by_name[row[i]]
            if prec.name not in made:
                w = params[param].detach().float()
                if prec.w_bits < 16:
                    if weights is None:
                        raise InputError(f"plan: {param} runs at {prec.name} but no weights file was given")
                    w = weights.find(param, prec.w_bits, prec.fmt).dequantize().reshape(w.shape).to(w.dtype)
                    a_fmt = prec.fmt if prec.a_bits < 16 else "int"
                    made[prec.name] = (prep.transform(w, prec.a_bits, a_fmt) if prep is not None
                                       else LayerTransform(w, prec.a_bits, a_fmt=a_fmt))
                else:
                    made[prec.name] = LayerTransform(w, prec.a_bits)
            steps.append(made[prec.name])
        out[param] = steps
    return out
