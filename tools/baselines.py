"""Round-to-nearest (RTN) fake quantization: the simplest baseline the evaluation harness can run.

``wWaA-rtn`` quantizes every quantizable Linear of the transformer (the layer table's linears):
weights symmetric per output channel to W bits (round to nearest, max-abs scale), activations
(the Linear's input) symmetric per token to A bits, dynamically. ``A = 16`` keeps activations in
floating point. Computation stays in fp32 ("fake" quantization): it measures the quality a real
low-bit kernel with these numerics would give. Proper quantizers (GPTQ, smoothing, ...) and the
AdaTSQ plans come with later issues.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from ..errors import InputError
from ..passes.quant import fake_quant_tokens, fake_quant_weight

_RTN = re.compile(r"^w(\d+)a(\d+)-rtn$")
SUPPORTED_BITS = (2, 3, 4, 6, 8, 16)


def parse_variant(name: str) -> tuple[int, int]:
    """``w4a8-rtn`` -> (4, 8); raises InputError for anything else."""
    m = _RTN.match(name)
    if not m or int(m.group(1)) not in SUPPORTED_BITS or int(m.group(2)) not in SUPPORTED_BITS:
        raise InputError(f"unknown variant {name!r}: expected 'fp' or 'w<bits>a<bits>-rtn' with bits in "
                         f"{SUPPORTED_BITS} (e.g. w8a8-rtn, w4a16-rtn)")
    return int(m.group(1)), int(m.group(2))


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
