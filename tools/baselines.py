"""Uniform-precision baselines the evaluation harness runs: ``w<W>a<A>-<method>``.

Every quantizable Linear of the transformer (the layer table's linears) gets W-bit weights,
symmetric per output channel, and A-bit inputs, symmetric per token, dynamic (``A = 16`` keeps
activations in floating point). Computation stays in fp32 ("fake" quantization): it measures the
quality a real low-bit kernel with these numerics would give. Methods:

* ``rtn``: round-to-nearest weights (max-abs scales);
* ``gptq``: GPTQ weights (:mod:`adatsq.passes.gptq`) with the uniform Hessian ``sum_t X_t^T X_t``
  over the default calibration set's trajectory;
* ``gptq-fisher``: GPTQ with AdaTSQ's Fisher-weighted Hessian ``sum_t alpha[t] X_t^T X_t``;
* ``gptq-fisher-latent``: the same with ``alpha`` from the latent-weighted Fisher
  ``I[t] dsigma_t^2`` (``--fisher-weighting latent`` of the analysis);
* ``smoothquant``: our SmoothQuant-style re-implementation: per-channel smoothing with ``alpha``
  searched per layer on calibration activations (steps 0, S/2, S-1 of 4 calibration samples),
  RTN weights, per-token dynamic activations (the original uses static per-tensor ones);
* ``quarot``: our QuaRot-style re-implementation: block-Hadamard rotation of every linear's input
  (computed exactly), GPTQ weights on the rotated Hessian ``R^T H R``;
* ``svdquant``: our SVDQuant-style re-implementation: smoothing (alpha searched), a 16-bit
  rank-32 branch, GPTQ on the residual with groups of 64 input channels (per channel where the
  input size is not a multiple of 64);
* ``qdit``: our Q-DiT-like re-implementation: a weight group size per layer (per channel, 128,
  64 or 32) chosen to minimise the summed relative Hessian-weighted output error of RTN weights
  under the scale storage of uniform groups of 64 (:func:`qdit_group_sizes`; Q-DiT searches the
  granularity evolutionarily on FID), with dynamic per-token activations (Q-DiT's are per sample);
* ``viditq``: our ViDiT-Q-like re-implementation: timestep-aware smoothing, one smoothing vector
  per step from that step's activation range with ``alpha`` searched per layer
  (:func:`~adatsq.passes.transforms.search_stepwise_smoothing`), RTN per-channel weights
  requantized for every step's scales (one weight copy per step), dynamic per-token activations.

Bit counts are those of the codes: scales, the low-rank branch and per-step copies are not counted
(as the papers report them).

All but ``rtn`` run the analysis passes (trajectory, Fisher, statistics) on the model's default
calibration set first; their results are cached like ``adatsq analyze``'s.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from ..errors import InputError
from ..passes.quant import fake_quant_tokens, fake_quant_weight

METHODS = ("rtn", "gptq", "gptq-fisher", "gptq-fisher-latent", "smoothquant", "quarot", "svdquant", "qdit", "viditq")
_VARIANT = re.compile(r"^w(\d+)a(\d+)-(" + "|".join(re.escape(m) for m in METHODS) + r")$")
SUPPORTED_BITS = (2, 3, 4, 6, 8, 16)

#: third-party quantizers run through the same harness (:mod:`adatsq.tools.peers`, optional
#: extras): variant name -> nominal (weight bits, activation bits) of the configuration
PEERS = {
    "modelopt-int8-sq": (8, 8),  # nvidia-modelopt INT8_SMOOTHQUANT_CFG
    "modelopt-int4-awq": (4, 16),  # nvidia-modelopt INT4_AWQ_CFG (weight-only)
    "modelopt-w4a8-awq": (4, 8),  # nvidia-modelopt W4A8_AWQ_BETA_CFG
    "modelopt-nvfp4": (4, 4),  # nvidia-modelopt NVFP4_DEFAULT_CFG (4.5 bits with its block scales; CUDA only)
    "modelopt-nvfp4-svdquant": (4, 4),  # nvidia-modelopt NVFP4_SVDQUANT_DEFAULT_CFG (CUDA only)
    "ct-w4a4": (4, 4),  # compressed-tensors W4A4 preset, group 64 (4.25 bits with its group scales)
    "ct-w3a3": (3, 3),  # compressed-tensors integer scheme at 3 bits, group 64
    "ct-nvfp4": (4, 4),  # compressed-tensors NVFP4 preset (4.5 bits with its group scales)
    "torchao-int8-dyn": (8, 8),  # torchao Int8DynamicActivationInt8WeightConfig
    "torchao-int4-wo": (4, 16),  # torchao Int4WeightOnlyConfig
}


def parse_variant(name: str) -> tuple[int, int]:
    """``w4a8-rtn`` -> (4, 8), a peer's name -> its nominal bits; raises InputError otherwise."""
    if name in PEERS:
        return PEERS[name]
    return _match(name)[:2]


def variant_method(name: str) -> str:
    """``w4a8-gptq-fisher`` -> ``gptq-fisher``; a peer's name -> ``peer``."""
    if name in PEERS:
        return "peer"
    return _match(name)[2]


def _match(name: str) -> tuple[int, int, str]:
    m = _VARIANT.match(name)
    if not m or int(m.group(1)) not in SUPPORTED_BITS or int(m.group(2)) not in SUPPORTED_BITS:
        raise InputError(f"unknown variant {name!r}: expected 'fp' or 'w<bits>a<bits>-<method>' with bits in "
                         f"{SUPPORTED_BITS} and method in {', '.join(METHODS)} (e.g. w8a8-rtn, w4a8-gptq-fisher), "
                         f"or a peer: {', '.join(PEERS)}")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel RTN of a [out, in] weight (dequantized back to float)."""
    return fake_quant_weight(w, bits)


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token (last dimension) dynamic RTN of an activation (dequantized back)."""
    return fake_quant_tokens(x, bits)


@contextlib.contextmanager
def rtn_quantized(transformer: nn.Module, w_bits: int, a_bits: int, layers: list[str]) -> Iterator[None]:
    """Within the context, the Linear modules named in ``layers`` (weight parameter names) run with
    RTN-quantized weights and inputs; the original weights are restored on exit."""
    modules = dict(transformer.named_modules())
    saved, hooks = {}, []
    try:
        for param in layers:
            mod = modules.get(param[: -len(".weight")])
            if not isinstance(mod, nn.Linear):
                continue
            saved[param] = mod.weight.data
            mod.weight.data = quantize_weight(mod.weight.data.float(), w_bits).to(mod.weight.dtype)
            if a_bits < 16:
                hooks.append(mod.register_forward_pre_hook(
                    lambda _m, args, b=a_bits: (quantize_activation(args[0], b), *args[1:])))
        yield
    finally:
        for h in hooks:
            h.remove()
        for param, data in saved.items():
            modules[param[: -len(".weight")]].weight.data = data


def reference_analysis(model: str, log=None, fisher_weighting: str = "loss"):
    """The analysis passes trajectory, Fisher and statistics (weighted Hessians) of a reference
    model on its default calibration set, cached under the default cache root: (result, calib)."""
    return annotated_reference_graph(model, log, fisher_weighting)[1:]


def annotated_reference_graph(model: str, log=None, fisher_weighting: str = "loss", cache_dir=None):
    """As :func:`reference_analysis`, also returning the exported graph the passes annotated:
    (graph, result, calib)."""
    from ..frontend.export import export_model
    from ..frontend.reference import load_reference
    from ..passes.analysis import AnalysisOptions, analyze
    from ..passes.cache import default_cache_root
    from ..passes.calibration import reference_calibration

    ref = load_reference(model)
    graph = export_model(model)
    calib = reference_calibration(ref)
    res = analyze(graph, calib, AnalysisOptions(hessian="weighted", fisher_weighting=fisher_weighting),
                  cache_dir=cache_dir or default_cache_root(),
                  passes=("trajectory", "fisher", "stats"), log=log)
    return graph, res, calib


def reference_hessians(model: str, log=None) -> dict:
    """Uniform and Fisher-weighted Hessians of a reference model (see :func:`reference_analysis`)."""
    return reference_analysis(model, log)[0].results["hessians"]


class MethodCache:
    """What several variants of one evaluation share: calibration rows replayed once for all
    layers, and smoothing searches (SmoothQuant and SVDQuant search the same thing at equal bits)."""

    def __init__(self):
        self.rows: dict = {}
        self.smoothing: dict = {}


def _calibration_rows(cache: MethodCache, calib, latents, layers: list[str], step: int, samples: int = 4) -> dict:
    from ..passes.analysis import replay_inputs

    key = (id(calib), step)
    if key not in cache.rows:
        cache.rows[key] = {p: x.float() for p, x in replay_inputs(
            calib, latents, step, layers, samples=range(min(samples, calib.num_samples))).items()}
    return cache.rows[key]


#: group sizes the Q-DiT-like allocation chooses from (None: one scale per output channel)
QDIT_GROUPS = (None, 128, 64, 32)
#: its budget: scale storage of uniform groups of this size (16-bit scales)
QDIT_BUDGET_GROUP = 64


def qdit_group_sizes(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], bits: int,
                     groups: tuple = QDIT_GROUPS, budget_group: int = QDIT_BUDGET_GROUP) -> dict[str, int | None]:
    """Q-DiT-like granularity allocation: a group size per layer minimising the summed relative
    output error ``tr(dW H dW^T) / tr(W H W^T)`` of RTN weights, under a scale-storage budget equal
    to uniform groups of ``budget_group`` (layers whose input size it does not divide count as per
    channel). Greedy from per channel: each move takes the layer and finer group size with the best
    error reduction per scale added that still fits the budget."""
    from ..passes.gptq import weighted_error

    opts, budget = {}, 0
    for p, w in weights.items():
        k = w.shape[1]
        cands = [g for g in groups if g is None or (k % g == 0 and g < k)]
        h = hessians[p]
        norm = max(weighted_error(w, torch.zeros_like(w), h), 1e-30)
        opts[p] = [(g, w.shape[0] * (1 if g is None else k // g),
                    weighted_error(w, fake_quant_weight(w, bits, g), h) / norm) for g in cands]
        budget += w.shape[0] * (k // budget_group if k % budget_group == 0 else 1)
    choice = {p: 0 for p in opts}  # index into opts[p] (ordered coarse -> fine)
    used = sum(o[0][1] for o in opts.values())
    while True:
        best = None
        for p, i in choice.items():
            _, c0, e0 = opts[p][i]
            for j in range(i + 1, len(opts[p])):  # any finer option: a gain may need two steps
                _, c1, e1 = opts[p][j]
                if used + c1 - c0 <= budget and e1 < e0:
                    gain = (e0 - e1) / (c1 - c0)
                    if best is None or gain > best[0]:
                        best = (gain, p, j)
        if best is None:
            break
        _, p, j = best
        used += opts[p][j][1] - opts[p][choice[p]][1]
        choice[p] = j
    return {p: opts[p][i][0] for p, i in choice.items()}


def method_transforms(transformer: nn.Module, method: str, w_bits: int, a_bits: int, layers: list[str],
                      analysis=None, calib=None, cache: MethodCache | None = None) -> dict:
    """The :class:`~adatsq.passes.transforms.LayerTransform` of every Linear in ``layers`` for a
    uniform baseline ``method`` at ``w_bits``/``a_bits`` (see the module docstring); for
    ``viditq`` a per-step list of them (run with a :class:`~adatsq.passes.transforms.StepClock`).
    ``cache`` shares calibration rows and smoothing searches between calls."""
    from ..passes.gptq import gptq
    from ..passes.transforms import (LayerTransform, block_hadamard, low_rank_split, search_smoothing,
                                     search_stepwise_smoothing, smoothing_scales, transformed_weight)

    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    cache = cache or MethodCache()
    modules = dict(transformer.named_modules())
    linears = [p for p in layers if isinstance(modules.get(p[: -len(".weight")]), nn.Linear)]
    hess = analysis.results["hessians"] if analysis is not None else None
    lat = analysis.results["trajectory"] if analysis is not None else None
    steps = sorted({0, calib.num_steps // 2, calib.num_steps - 1}) if calib is not None else []

    def wq(w, h, group=None):
        if w_bits >= 16:
            return w
        if h is None:
            return fake_quant_weight(w, w_bits, group)
        return gptq(w, h, w_bits, group).dequantize()

    def rows(p, step=None):
        if step is not None:
            return _calibration_rows(cache, calib, lat, linears, step)[p]
        return torch.cat([_calibration_rows(cache, calib, lat, linears, t)[p] for t in steps])

    def smoothing(p, w):
        key = (p, w_bits, a_bits)
        if key not in cache.smoothing:
            cache.smoothing[key] = search_smoothing(rows(p), w, w_bits, a_bits)[1]
        return cache.smoothing[key]

    weights = {p: modules[p[: -len(".weight")]].weight.data.float() for p in linears}
    groups = (qdit_group_sizes(weights, {p: hess[p].mean(0) for p in linears}, w_bits)
              if method == "qdit" and w_bits < 16 else {})
    out = {}
    for p in linears:
        w = weights[p]
        k = w.shape[1]
        if method == "rtn":
            out[p] = LayerTransform(fake_quant_weight(w, w_bits), a_bits)
        elif method in ("gptq", "gptq-fisher", "gptq-fisher-latent"):
            out[p] = LayerTransform(wq(w, hess[p].mean(0 if method == "gptq" else 1)), a_bits)
        elif method == "smoothquant":
            sm = smoothing(p, w)
            out[p] = LayerTransform(fake_quant_weight(transformed_weight(w, sm), w_bits), a_bits, smooth=sm)
        elif method == "quarot":
            r = block_hadamard(k)
            h = r.T.double() @ hess[p].mean(0) @ r.double()
            out[p] = LayerTransform(wq(transformed_weight(w, None, r), h), a_bits, rotation=r)
        elif method == "svdquant":
            sm = smoothing(p, w)
            a, b, res = low_rank_split(transformed_weight(w, sm), 32)
            h = hess[p].mean(0) / sm.double()[:, None] / sm.double()[None, :]
            out[p] = LayerTransform(wq(res, h, 64 if k % 64 == 0 else None), a_bits, smooth=sm, low_rank=(a, b))
        elif method == "qdit":
            out[p] = LayerTransform(fake_quant_weight(w, w_bits, groups.get(p)), a_bits)
        elif method == "viditq":
            am = analysis.results["stats"][p].channel_absmax.float()  # [S, K]
            alpha, _ = search_stepwise_smoothing([rows(p, t) for t in steps], [am[t] for t in steps], w, w_bits, a_bits)
            per_step = []
            for t in range(am.shape[0]):
                sm = smoothing_scales(am[t], w, alpha)
                per_step.append(LayerTransform(fake_quant_weight(transformed_weight(w, sm), w_bits), a_bits, smooth=sm))
            out[p] = per_step
    return out
