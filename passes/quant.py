"""Reference quantization ops: the numerics every backend must reproduce.

All ops are symmetric (zero point 0), exact in float32 on CPU and CUDA, and come in two forms:
``quantize_*`` returns the integer (or FP8) codes and the scales, ``fake_quant_*`` returns the
dequantized float tensor (what a simulation runs).

* INT-k weights, k = 2..8: one scale per output channel (``group_size=None``) or per group of
  ``group_size`` consecutive input channels; ``scale = absmax / qmax`` with ``qmax = 2^(k-1) - 1``
  and codes clamped to ``[-qmax - 1, qmax]`` (the extra negative code is never produced by
  rounding ``absmax/scale``, only by GPTQ's error feedback);
* INT-k activations: dynamic per token (one scale per row of the last dimension) or static per
  tensor with a scale from calibration;
* FP8 E4M3 (``torch.float8_e4m3fn``, max 448): per-output-channel weight scales, per-token or
  per-tensor activation scales.

Bits of 16 or more mean "kept in floating point": every op is then the identity.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"integer quantization supports 2..8 bits, got {bits}")
    return 2 ** (bits - 1) - 1


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[O, K] -> [O, K/g, g] (or [O, 1, K] per channel)."""
    flat = w.reshape(w.shape[0], -1)
    if group_size is None:
        return flat[:, None, :]
    if flat.shape[1] % group_size:
        raise ValueError(f"input size {flat.shape[1]} is not a multiple of the group size {group_size}")
    return flat.reshape(flat.shape[0], -1, group_size)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes ``[O, K]`` (int8 storage) and scales ``[O, K/g]`` (``[O, 1]`` per channel)."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int | None
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        g = _grouped(self.codes.float(), self.group_size)
        return (g * self.scales[:, :, None]).reshape(self.shape)


def weight_scales(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Max-abs scales ``[O, K/g]`` of a weight."""
    g = _grouped(w.float(), group_size)
    return g.abs().amax(dim=2).clamp_min(1e-12) / qmax(bits)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None,
                    scales: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest INT-``bits`` codes of ``w`` (``scales`` default: max-abs)."""
    s = weight_scales(w, bits, group_size) if scales is None else scales
    q = qmax(bits)
    g = _grouped(w.float(), group_size)
    codes = torch.clamp(torch.round(g / s[:, :, None]), -q - 1, q).to(torch.int8)
    return QuantizedWeight(codes.reshape(w.shape[0], -1), s, bits, group_size, tuple(w.shape))


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Dequantized RTN weight (identity for bits >= 16)."""
    if bits >= 16:
        return w
    return quantize_weight(w, bits, group_size).dequantize().to(w.dtype)


def fake_quant_tokens(x: torch.Tensor, bits: int, dims: int | tuple[int, ...] = -1) -> torch.Tensor:
    """Dynamic symmetric INT quantization with one scale per slice over ``dims`` (default: per
    token, the last dimension), dequantized. Identity for bits >= 16."""
    if bits >= 16:
        return x
    q = qmax(bits)
    if x.requires_grad:
        scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / q
        return (x / scale).round().clamp(-q - 1, q) * scale
    # the same numbers with fewer full-size temporaries (max |x| without an |x| copy, in place)
    # max|x| as max(max x, -min x): two plain reductions, ~20x faster on CPU than vector_norm(inf)
    scale = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())
    scale = scale.clamp_min_(1e-12).div_(q)
    return (x / scale).round_().clamp_(-q - 1, q).mul_(scale)


def fake_quant_static(x: torch.Tensor, bits: int, scale: float | torch.Tensor) -> torch.Tensor:
    """Static per-tensor INT quantization with a calibrated ``scale`` (values beyond clip)."""
    if bits >= 16:
        return x
    q = qmax(bits)
    return (x / scale).round().clamp(-q - 1, q) * scale


def fp8_e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """FP8 E4M3 round trip of ``x / scale`` (saturating at 448), dequantized."""
    y = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX)
    return (y.to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def fake_quant_weight_fp8(w: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 weight with one scale per output channel."""
    flat = w.reshape(w.shape[0], -1).float()
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return fp8_e4m3(flat, scale).reshape(w.shape).to(w.dtype)


def fake_quant_tokens_fp8(x: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 activation with one scale per token."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return fp8_e4m3(x, scale)


def fp8_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` with the numerics of an FP8 flash-attention kernel: Q, K and V
    in FP8 E4M3 with one scale per (head, token) row, the unnormalised probabilities
    ``exp(S - rowmax)`` (in (0, 1], 1 at the row's max) in FP8 with the fixed scale 1/448 for the
    PV product, the row sums and the normalisation in float32. Causal masks, dropout and GQA are not
    simulated (a clear error)."""
    if is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("fp8_sdpa simulates plain (non-causal, no dropout, no GQA) attention")
    q, k, v = (fake_quant_tokens_fp8(t).float() for t in (query, key, value))
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    out = (fp8_e4m3(p, 1.0 / FP8_MAX) @ v) / p.sum(dim=-1, keepdim=True)
    return out.to(query.dtype)


@contextlib.contextmanager
def fp8_attention():
    """Inside: ``torch.nn.functional.scaled_dot_product_attention`` (what diffusers' native attention
    backend calls) runs :func:`fp8_sdpa` (an eval variant measuring what FP8 attention costs in
    quality, issue 9). Not thread-safe: the function is swapped for the whole process."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fp8_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """INT4 codes (values -8..7, any integer dtype) -> uint8, two per byte, the first element of
    each pair in the low nibble (ONNX's INT4 layout); an odd count is padded with one zero."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError("pack_int4: codes outside -8..7")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = (flat & 0xF).to(torch.uint8)
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes of ``shape``."""
    p = packed.reshape(-1).to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=1).reshape(-1)
    vals = torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    n = 1
    for d in shape:
        n *= d
    if vals.numel() < n:
        raise ValueError(f"unpack_int4: {packed.numel()} bytes cannot hold {n} codes")
    return vals[:n].reshape(shape)
