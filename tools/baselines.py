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
  input size is not a multiple of 64).

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

METHODS = ("rtn", "gptq", "gptq-fisher", "gptq-fisher-latent", "smoothquant", "quarot", "svdquant")
_VARIANT = re.compile(r"^w(\d+)a(\d+)-(" + "|".join(re.escape(m) for m in METHODS) + r")$")
SUPPORTED_BITS = (2, 3, 4, 6, 8, 16)


def parse_variant(name: str) -> tuple[int, int]:
    """``w4a8-rtn`` -> (4, 8); raises InputError for anything else."""
    return _match(name)[:2]


def variant_method(name: str) -> str:
    """``w4a8-gptq-fisher`` -> ``gptq-fisher``."""
    return _match(name)[2]


def _match(name: str) -> tuple[int, int, str]:
    m = _VARIANT.match(name)
    if not m or int(m.group(1)) not in SUPPORTED_BITS or int(m.group(2)) not in SUPPORTED_BITS:
        raise InputError(f"unknown variant {name!r}: expected 'fp' or 'w<bits>a<bits>-<method>' with bits in "
                         f"{SUPPORTED_BITS} and method in {', '.join(METHODS)} (e.g. w8a8-rtn, w4a8-gptq-fisher)")
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
    from ..frontend.export import export_model
    from ..frontend.reference import load_reference
    from ..passes.analysis import AnalysisOptions, analyze
    from ..passes.cache import default_cache_root
    from ..passes.calibration import reference_calibration

    ref = load_reference(model)
    graph = export_model(model)
    calib = reference_calibration(ref)
    res = analyze(graph, calib, AnalysisOptions(hessian="weighted", fisher_weighting=fisher_weighting),
                  cache_dir=default_cache_root(),
                  passes=("trajectory", "fisher", "stats"), log=log)
    return res, calib


def reference_hessians(model: str, log=None) -> dict:
    """Uniform and Fisher-weighted Hessians of a reference model (see :func:`reference_analysis`)."""
    return reference_analysis(model, log)[0].results["hessians"]


def method_transforms(transformer: nn.Module, method: str, w_bits: int, a_bits: int, layers: list[str],
                      analysis=None, calib=None) -> dict:
    """The :class:`~adatsq.passes.transforms.LayerTransform` of every Linear in ``layers`` for a
    uniform baseline ``method`` at ``w_bits``/``a_bits`` (see the module docstring)."""
    from ..passes.analysis import replay_inputs
    from ..passes.gptq import gptq
    from ..passes.transforms import (LayerTransform, block_hadamard, low_rank_split, search_smoothing,
                                     transformed_weight)

    modules = dict(transformer.named_modules())
    hess = analysis.results["hessians"] if analysis is not None else None
    lat = analysis.results["trajectory"] if analysis is not None else None
    steps = sorted({0, calib.num_steps // 2, calib.num_steps - 1}) if calib is not None else []

    def wq(w, h, group=None):
        if w_bits >= 16:
            return w
        if h is None:
            return fake_quant_weight(w, w_bits, group)
        return gptq(w, h, w_bits, group).dequantize()

    def calib_rows(p):
        return torch.cat([replay_inputs(calib, lat, t, [p], samples=range(min(4, calib.num_samples)))[p]
                          for t in steps]).float()

    out = {}
    for p in layers:
        mod = modules[p[: -len(".weight")]]
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.data.float()
        k = w.shape[1]
        if method == "rtn":
            out[p] = LayerTransform(fake_quant_weight(w, w_bits), a_bits)
        elif method in ("gptq", "gptq-fisher", "gptq-fisher-latent"):
            out[p] = LayerTransform(wq(w, hess[p].mean(0 if method == "gptq" else 1)), a_bits)
        elif method == "smoothquant":
            _, sm, _ = search_smoothing(calib_rows(p), w, w_bits, a_bits)
            out[p] = LayerTransform(fake_quant_weight(transformed_weight(w, sm), w_bits), a_bits, smooth=sm)
        elif method == "quarot":
            r = block_hadamard(k)
            h = r.T.double() @ hess[p].mean(0) @ r.double()
            out[p] = LayerTransform(wq(transformed_weight(w, None, r), h), a_bits, rotation=r)
        elif method == "svdquant":
            _, sm, _ = search_smoothing(calib_rows(p), w, w_bits, a_bits)
            a, b, res = low_rank_split(transformed_weight(w, sm), 32)
            h = hess[p].mean(0) / sm.double()[:, None] / sm.double()[None, :]
            out[p] = LayerTransform(wq(res, h, 64 if k % 64 == 0 else None), a_bits, smooth=sm, low_rank=(a, b))
        else:
            raise InputError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return out
