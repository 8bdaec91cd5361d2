"""Uniform-precision baselines the evaluation harness runs: ``w<W>a<A>-<method>``.

Every quantizable Linear of the transformer (the layer table's linears) gets W-bit weights,
symmetric per output channel, and A-bit inputs, symmetric per token, dynamic (``A = 16`` keeps
activations in floating point). Computation stays in fp32 ("fake" quantization): it measures the
quality a real low-bit kernel with these numerics would give. Methods:

* ``rtn``: round-to-nearest weights (max-abs scales);
* ``gptq``: GPTQ weights (:mod:`adatsq.passes.gptq`) with the uniform Hessian ``sum_t X_t^T X_t``
  over the default calibration set's trajectory;
* ``gptq-fisher``: GPTQ with AdaTSQ's Fisher-weighted Hessian ``sum_t alpha[t] X_t^T X_t``.

The GPTQ methods run the analysis passes (trajectory, Fisher, statistics) on the model's default
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

METHODS = ("rtn", "gptq", "gptq-fisher")
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
    weights = {p: quantize_weight(modules[p[:-len(".weight")]].weight.data.float(), w_bits)
               for p in layers if isinstance(modules.get(p[:-len(".weight")]), nn.Linear)}
    with fake_quantized(transformer, weights, a_bits):
        yield


@contextlib.contextmanager
def fake_quantized(transformer: nn.Module, weights: dict[str, torch.Tensor], a_bits: int) -> Iterator[None]:
    """Within the context, each Linear named in ``weights`` (weight parameter names) runs with that
    (dequantized) weight and ``a_bits`` per-token inputs; the original weights come back on exit."""
    modules = dict(transformer.named_modules())
    saved, hooks = {}, []
    try:
        for param, w in weights.items():
            mod = modules[param[: -len(".weight")]]
            saved[param] = mod.weight.data
            mod.weight.data = w.to(mod.weight.dtype)
            if a_bits < 16:
                hooks.append(mod.register_forward_pre_hook(
                    lambda _m, args, b=a_bits: (quantize_activation(args[0], b), *args[1:])))
        yield
    finally:
        for h in hooks:
            h.remove()
        for param, data in saved.items():
            modules[param[: -len(".weight")]].weight.data = data


def gptq_weights(transformer: nn.Module, hessians: dict, w_bits: int, layers: list[str], fisher: bool,
                 options=None) -> dict[str, torch.Tensor]:
    """GPTQ-quantized (dequantized) weights of ``layers`` from the analysis Hessians (``weighted``
    mode: slot 0 uniform, slot 1 Fisher-weighted)."""
    from ..passes.gptq import GPTQOptions, gptq

    modules = dict(transformer.named_modules())
    out = {}
    for p in layers:
        mod = modules[p[: -len(".weight")]]
        if not isinstance(mod, nn.Linear):
            continue
        h = hessians[p].mean(1 if fisher else 0)
        out[p] = gptq(mod.weight.data.float(), h, w_bits, options=options or GPTQOptions()).dequantize()
    return out


def reference_hessians(model: str, log=None) -> dict:
    """Uniform and Fisher-weighted Hessians of a reference model on its default calibration set
    (analysis passes trajectory, Fisher, statistics; cached under the default cache root)."""
    from ..frontend.export import export_model
    from ..frontend.reference import load_reference
    from ..passes.analysis import AnalysisOptions, analyze
    from ..passes.cache import default_cache_root
    from ..passes.calibration import reference_calibration

    ref = load_reference(model)
    graph = export_model(model)
    res = analyze(graph, reference_calibration(ref), AnalysisOptions(hessian="weighted"),
                  cache_dir=default_cache_root(), passes=("trajectory", "fisher", "stats"), log=log)
    return res.results["hessians"]
