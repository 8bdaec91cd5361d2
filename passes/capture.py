"""Layer-level capture: hooks on the quantizable layers of the eager model, keyed by parameter name.

The analysis passes replay the denoiser on trajectory points; these helpers see what every
quantizable layer (a row of the layer table) receives and emits, as per-sample token matrices:

* :func:`input_tokens` -> ``[B, T, K]``: a Linear's input rows, or a convolution's input patches
  (``K = C * prod(kernel)``, the columns its weight multiplies), so Hessians and per-sample
  gradients of convolutions use the same formulas as Linears;
* :func:`output_tokens` -> ``[B, T, O]``.

A layer called more than once in a forward (DiT's shared timestep embedder) has its calls
concatenated along the token axis: the gradient of its weight is the sum over calls, which is one
``G^T X`` over the concatenated tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import InputError, UnsupportedArchitectureError
from .quant import fake_quant_tokens


def layer_modules(transformer: nn.Module, params: list[str]) -> dict[str, nn.Module]:
    """Map layer-table keys (``<module>.weight``) to the modules of ``transformer``."""
    mods = dict(transformer.named_modules())
    out = {}
    for p in params:
        m = mods.get(p[: -len(".weight")] if p.endswith(".weight") else p)
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            raise UnsupportedArchitectureError(
                f"analysis: layer {p} is not a Linear/Conv2d/Conv3d of the model "
                f"(found {type(m).__name__ if m is not None else 'nothing'}); was the graph exported from this model?")
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.groups != 1:
            raise UnsupportedArchitectureError(f"analysis: grouped convolution {p} is not supported")
        out[p] = m
    return out


def input_tokens(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight multiplies, per sample: ``[B, T, K]``."""
    if isinstance(module, nn.Linear):
        if x.dim() == 1:
            x = x[None]
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nd = x.dim() - 2
        if isinstance(module.padding, str):
            raise UnsupportedArchitectureError(f"analysis: convolution padding {module.padding!r} is not supported")
        if any(module.padding):
            pads = []
            for p in reversed(module.padding):
                pads += [p, p]
            x = F.pad(x, pads)
        for d in range(nd):
            k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
            if dil != 1:
                raise UnsupportedArchitectureError("analysis: dilated convolutions are not supported")
            x = x.unfold(2 + d, k, s)
        # [B, C, *spatial', *kernel] -> [B, prod(spatial'), C * prod(kernel)]
        b, c = x.shape[:2]
        spatial = x.shape[2:2 + nd]
        perm = [0] + list(range(2, 2 + nd)) + [1] + list(range(2 + nd, 2 + 2 * nd))
        x = x.permute(*perm)
        t = 1
        for s in spatial:
            t *= s
        return x.reshape(b, t, -1)
    raise TypeError(type(module).__name__)


def output_tokens(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's outputs per sample: ``[B, T, O]`` (token order matching :func:`input_tokens`)."""
    if isinstance(module, nn.Linear):
        if y.dim() == 1:
            y = y[None]
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.flatten(2).transpose(1, 2)


@contextlib.contextmanager
def capture(modules: Mapping[str, nn.Module], on_call: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], Any]
            ) -> Iterator[None]:
    """Call ``on_call(param, module, input, output)`` after every call of each module."""
    handles = []
    try:
        for p, m in modules.items():
            handles.append(m.register_forward_hook(lambda mod, args, out, p=p: on_call(p, mod, args[0], out)))
        yield
    finally:
        for h in handles:
            h.remove()


def per_sample_weight_grad_sqnorm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||G_b^T X_b||_F^2`` for every sample ``b``: the squared norm of the per-sample gradient of a
    weight whose layer saw inputs ``X_b`` [T, K] and received output gradients ``G_b`` [T, O].

    Uses the Gram form ``sum((X X^T) * (G G^T))`` when ``T^2 < K*O`` (cheaper for few tokens), and
    the explicit per-sample gradient otherwise. The products run in the model's dtype where that is
    16-bit (bf16 GEMMs accumulate in float32; float32 GEMMs made this 4x slower than the whole
    forward+backward of a Flux-dev slice on an H100) and in float32 otherwise; the final sum is
    float64.
    """
    dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    x, g = x.to(dt), g.to(dt)
    t, k, o = x.shape[1], x.shape[2], g.shape[2]
    if t * t < k * o:
        return ((x @ x.transpose(1, 2)) * (g @ g.transpose(1, 2))).double().sum(dim=(1, 2))
    return (g.transpose(1, 2) @ x).double().square().sum(dim=(1, 2))


# --------------------------------------------------------------------------- fake quantization
def quantized_call(module: nn.Module, x: torch.Tensor, w_q: torch.Tensor, a_bits: int, a_fmt: str = "int"
                   ) -> torch.Tensor:
    """The layer evaluated with a (fake-)quantized weight ``w_q`` and ``a_bits`` input activations
    (in number format ``a_fmt``).

    Linear inputs are quantized per token; convolution inputs per sample (one scale over channels
    and positions), since a patch-embedding conv sees only a handful of channels per position.
    """
    w_q = w_q.to(x.dtype)
    if isinstance(module, nn.Linear):
        return F.linear(fake_quant_tokens(x, a_bits, fmt=a_fmt), w_q, module.bias)
    xq = fake_quant_tokens(x, a_bits, dims=tuple(range(1, x.dim())), fmt=a_fmt)
    return module._conv_forward(xq, w_q, module.bias)


@contextlib.contextmanager
def replicated_quantization(modules: Mapping[str, nn.Module], weights: Mapping[str, list[torch.Tensor]],
                            a_bits: list[int], replicas: int, a_fmts: list[str] | None = None) -> Iterator[None]:
    """Within the context the batch holds ``replicas`` equal slices; slice ``r`` of every module in
    ``modules`` runs with weight ``weights[param][r]`` and ``a_bits[r]``-bit inputs (16 = float) in
    format ``a_fmts[r]`` (default: integers).
    Other modules run as usual. Used to evaluate several precisions of one layer group in one batch."""
    saved = {}
    fmts = list(a_fmts) if a_fmts is not None else ["int"] * len(a_bits)
    try:
        for p, m in modules.items():
            saved[p] = m.__dict__.get("forward")

            def fwd(x, m=m, ws=weights[p]):
                if x.shape[0] % replicas:
                    raise InputError(f"replicated quantization: batch {x.shape[0]} not divisible by {replicas}")
                return torch.cat([quantized_call(m, xs, ws[r], a_bits[r], fmts[r])
                                  for r, xs in enumerate(x.chunk(replicas))])

            m.forward = fwd
        yield
    finally:
        for p, f in saved.items():
            if f is None:
                del modules[p].forward
            else:
                modules[p].forward = f
