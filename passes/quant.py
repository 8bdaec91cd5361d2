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
  per-tensor activation scales;
* NVFP4 (format ``"nvfp4"``, NVIDIA's Blackwell 4-bit float, as modelopt simulates it): FP4 E2M1
  values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) in blocks of 16 consecutive inputs, each
  block with its own scale stored in FP8 E4M3 relative to one float32 scale per tensor (weights) or
  per token (activations; a deployed kernel takes one per tensor from calibration, which only moves
  the E4M3 scales' range). 4.5 bits per value. A :class:`QuantizedWeight` in this format holds the
  codes ``2 v`` (integers in -12..12) and the scales halved, so it dequantizes like the INT ones.

Bits of 16 or more mean "kept in floating point": every op is then the identity.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest FP4 E2M1 magnitude
NVFP4_BLOCK = 16  # values per NVFP4 block scale
#: the number formats a lattice point can use: integer (any bits) or NVFP4 (4 bits, 16-value blocks)
FORMATS = ("int", "nvfp4")


def check_format(fmt: str, bits: int) -> None:
    """A clear error for an unknown format or a bit-width the format does not have."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown number format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "nvfp4" and bits not in (4, 16):
        raise ValueError(f"NVFP4 is a 4-bit format, got {bits} bits")


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
    """Integer codes ``[O, K]`` (int8 storage) and scales ``[O, K/g]`` (``[O, 1]`` per channel).
    ``fmt="nvfp4"``: the codes are twice the FP4 values and the scales half the block scales
    (``group_size`` 16), so :meth:`dequantize` is the same product."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int | None
    shape: tuple[int, ...]
    fmt: str = "int"

    def dequantize(self) -> torch.Tensor:
        g = _grouped(self.codes.float(), self.group_size)
        return (g * self.scales[:, :, None]).reshape(self.shape)


def weight_scales(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Max-abs scales ``[O, K/g]`` of a weight."""
    g = _grouped(w.float(), group_size)
    return g.abs().amax(dim=2).clamp_min(1e-12) / qmax(bits)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None,
                    scales: torch.Tensor | None = None, fmt: str = "int") -> QuantizedWeight:
    """Round-to-nearest INT-``bits`` codes of ``w`` (``scales`` default: max-abs); ``fmt="nvfp4"``:
    :func:`quantize_weight_nvfp4` (``group_size`` must be None or 16)."""
    if fmt != "int":
        check_format(fmt, bits)
        block = nvfp4_block(w.reshape(w.shape[0], -1).shape[1])
        if group_size not in (None, block):
            raise ValueError(f"NVFP4 weights come in blocks of {block}, not groups of {group_size}")
        return quantize_weight_nvfp4(w, scales)
    s = weight_scales(w, bits, group_size) if scales is None else scales
    q = qmax(bits)
    g = _grouped(w.float(), group_size)
    codes = torch.clamp(torch.round(g / s[:, :, None]), -q - 1, q).to(torch.int8)
    return QuantizedWeight(codes.reshape(w.shape[0], -1), s, bits, group_size, tuple(w.shape))


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None = None, fmt: str = "int") -> torch.Tensor:
    """Dequantized RTN weight (identity for bits >= 16)."""
    if bits >= 16:
        return w
    return quantize_weight(w, bits, group_size, fmt=fmt).dequantize().to(w.dtype)


def fake_quant_tokens(x: torch.Tensor, bits: int, dims: int | tuple[int, ...] = -1, fmt: str = "int") -> torch.Tensor:
    """Dynamic symmetric INT quantization with one scale per slice over ``dims`` (default: per
    token, the last dimension), dequantized. Identity for bits >= 16. ``fmt="nvfp4"``:
    :func:`fake_quant_tokens_nvfp4` (blocks along the last dimension; ``dims`` other than the last
    -- a convolution's per-sample slices -- put the channel dimension last first)."""
    if bits >= 16:
        return x
    if fmt != "int":
        check_format(fmt, bits)
        if dims == -1 or dims == (x.dim() - 1,):
            return fake_quant_tokens_nvfp4(x)
        return fake_quant_tokens_nvfp4(x.movedim(1, -1)).movedim(-1, 1)
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


def nvfp4_block(k: int) -> int:
    """The NVFP4 block along an input dimension of ``k``: 16, or the whole of a dimension under 16
    (a patch embedding's few inputs: a finer block, its scale counted as if it were 16 wide)."""
    if k % NVFP4_BLOCK == 0:
        return NVFP4_BLOCK
    if k < NVFP4_BLOCK:
        return k
    raise ValueError(f"NVFP4: input size {k} is not a multiple of {NVFP4_BLOCK}")


def fp4_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (ties to even, as the hardware conversion does),
    saturating at +-6. The grid: 0, 0.5, 1, 1.5 (step 0.5), 2, 3 (step 1), 4, 6 (step 2)."""
    a = y.abs().clamp_max(FP4_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(a.dtype)
    return torch.copysign(torch.round(a / step) * step, y)


def fp4_at(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The FP4 values of ``x / scale`` (``scale`` broadcast against ``x``); 0 where the scale is 0
    (an all-zero block, or one whose scale underflowed E4M3)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, fp4_e2m1(x / safe), torch.zeros_like(x))


def _nvfp4_blocks(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., n, 16] and a float32 ``global_scale`` broadcastable to [..., 1, 1] -> (FP4 values
    of ``x / scale``, block scales [..., n, 1]): each block's max-abs / 6 in E4M3 units of the global
    scale. A block whose scale underflows E4M3 (or is all zero) has scale 0 and values 0."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    rel = (amax / (FP4_MAX * global_scale)).clamp_max(FP8_MAX)
    scale = rel.to(torch.float8_e4m3fn).float() * global_scale
    return fp4_at(x, scale), scale


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The float32 scale that maps a max-abs ``amax`` onto the largest block scale (448 x 6)."""
    return (amax.float() / (FP4_MAX * FP8_MAX)).clamp_min(1e-30)


def nvfp4_weight_scales(w: torch.Tensor) -> torch.Tensor:
    """The block scales ``[O, K/16]`` of an NVFP4 weight (one global scale over the tensor)."""
    flat = w.reshape(w.shape[0], -1).float()
    g = flat.reshape(flat.shape[0], -1, nvfp4_block(flat.shape[1]))
    return _nvfp4_blocks(g, nvfp4_global_scale(flat.abs().amax()))[1][..., 0]


def quantize_weight_nvfp4(w: torch.Tensor, scales: torch.Tensor | None = None) -> QuantizedWeight:
    """NVFP4 codes of ``w`` [O, K] (K a multiple of 16), round to nearest, with the block scales
    ``scales`` [O, K/16] (default: :func:`nvfp4_weight_scales`). Stored as codes ``2 v`` and
    scales / 2 (see :class:`QuantizedWeight`)."""
    s = nvfp4_weight_scales(w) if scales is None else scales.float()
    block = nvfp4_block(w.reshape(w.shape[0], -1).shape[1])
    g = w.reshape(w.shape[0], -1).float().reshape(w.shape[0], -1, block)
    if s.shape != g.shape[:2]:
        raise ValueError(f"NVFP4: scales {tuple(s.shape)} do not fit a weight of {tuple(w.shape)}")
    v = fp4_at(g, s[:, :, None])
    return QuantizedWeight((2 * v).to(torch.int8).reshape(w.shape[0], -1), s / 2, 4, block,
                           tuple(w.shape), "nvfp4")


def fake_quant_tokens_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 activations: blocks of 16 along the last dimension (a multiple of 16), one global
    scale per token, dequantized."""
    n = x.shape[-1]
    block = nvfp4_block(n)
    xf = x.float()
    g = xf.reshape(*x.shape[:-1], n // block, block)
    gs = nvfp4_global_scale(xf.abs().amax(dim=-1, keepdim=True))[..., None]
    v, scale = _nvfp4_blocks(g, gs)
    return (v * scale).reshape(x.shape).to(x.dtype)


#: E2M1 magnitudes x 2 in code order (nibble bits 0-2; bit 3 is the sign)
_FP4_CODES = (0, 1, 2, 3, 4, 6, 8, 12)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """NVFP4 codes (``2 v``: 0, +-1, +-2, +-3, +-4, +-6, +-8, +-12) -> uint8 E2M1 nibbles (sign in
    bit 3), two per byte, low nibble first like :func:`pack_int4`."""
    flat = codes.reshape(-1).to(torch.int16)
    lut = torch.full((13,), -1, dtype=torch.int16)
    lut[list(_FP4_CODES)] = torch.arange(8, dtype=torch.int16)
    mag = lut[flat.abs().clamp_max(12).long()]
    if flat.numel() and (int(flat.abs().max()) > 12 or bool((mag < 0).any())):
        raise ValueError("pack_fp4: codes are not twice FP4 E2M1 values")
    nib = (mag | torch.where(flat < 0, 8, 0).to(torch.int16)).to(torch.uint8)
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_fp4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: int8 codes (``2 v``) of ``shape``."""
    nib = _nibbles(packed, shape, "unpack_fp4")
    mag = torch.tensor(_FP4_CODES, dtype=torch.int16)[(nib & 7).long()]
    return torch.where(nib >= 8, -mag, mag).to(torch.int8).reshape(shape)


def _nibbles(packed: torch.Tensor, shape: tuple[int, ...], who: str) -> torch.Tensor:
    """The first ``prod(shape)`` 4-bit fields of ``packed`` (low nibble first), as int16."""
    p = packed.reshape(-1).to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=1).reshape(-1)
    n = 1
    for d in shape:
        n *= d
    if nib.numel() < n:
        raise ValueError(f"{who}: {packed.numel()} bytes cannot hold {n} codes")
    return nib[:n]


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
    nib = _nibbles(packed, shape, "unpack_int4")
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8).reshape(shape)
