"""Quantized GEMM kernels for the GPU runtime (Triton; torch where torch is already fast).

Every public op computes ``y = x W^T (+ b)`` for a weight ``W [N, K]`` packed by the matching
``pack_*`` helper, and has two implementations:

* **triton**: CUDA tensors, needs ``triton`` (Hopper or Ampere; FP8 needs compute capability
  >= 8.9). INT8 W8A8 runs one Triton GEMM on the integer tensor cores (int32 accumulation) with
  the per-token x per-channel dequantization (and the bias) fused in its epilogue; the per-token
  activation quantization is one Triton pass in front of it (one read of ``x``, one write of the
  int8 codes and the scales). FP8 W8A8 quantizes the activations with the same Triton pass and
  calls ``torch._scaled_mm`` (cuBLASLt, row-wise scales). W4A16 and W4A8 with groups unpack the
  INT4 codes inside the GEMM's K loop; W4A8 per channel does so below ``W4A8_UNPACK_MIN_M``
  tokens, and from there on expands the weight to an int8 scratch (one memory-bound pass) and
  runs the INT8 GEMM, which is faster where the GEMM is compute-bound (docs/kernels.md).
* **torch** (the reference ops): any device, written with ``passes/quant.py``'s numerics. On a
  machine without triton or CUDA the public ops take this path (``backend="auto"``), so a CPU
  runtime and the CPU tests use exactly these numbers; ``backend="triton"`` raises
  :class:`KernelUnavailable` there instead.

Numerics (what the GPU tests check, on random non-zero inputs):

* activations are quantized in float32 from the input's values: the codes and scales equal
  ``fake_quant_tokens(x.float(), 8)`` / ``fake_quant_tokens_fp8(x.float())`` bit for bit
  (scale = max|x| / qmax per row with IEEE division, round half to even, clamp to
  [-qmax - 1, qmax]; FP8: clamp to +-448 and round to nearest even E4M3). For a bf16 ``x`` this is
  *not* ``fake_quant_tokens(x, 8)`` run in bf16 (which rounds the scale to bf16);
* INT8 x INT8 and INT8 x INT4 products are summed exactly in int32; the result is converted to
  float32 (exact below 2^24, else one float32 rounding) and multiplied by the activation scale,
  then by the weight scale (float32), plus the bias, then rounded to the output dtype. So the
  float32 output equals the exact reference to ~1e-7 relative, and a bf16 output is within one
  bf16 rounding (2^-8 relative) of it;
* W4A8 with groups and W4A16 accumulate in float32 (order differs from torch: ~1e-6 relative);
  W4A16 with groups rounds each dequantized weight (code x group scale) to the activation dtype
  before the bf16 tensor-core product (2^-9 relative per weight);
* FP8 (cuBLASLt) accumulates in float32 and applies both scales in its epilogue.

Layouts (made by the ``pack_*`` helpers, once per weight at preparation time):

* INT8: codes ``[N, K]`` int8 row-major (K contiguous: the K-major operand the int8 tensor cores
  read), per-output-channel float32 scales ``[N]``. Group-wise INT8 weights are not supported.
* FP8: ``[N, K]`` float8_e4m3fn row-major, per-channel scales ``[N]`` (``_scaled_mm`` gets the
  column-major view ``W.t()``).
* INT4: ``pack_int4`` of the ``[N, K]`` codes (two codes a byte, the even k in the low nibble;
  ``[N, K/2]`` uint8 -- the same bytes as the ONNX INT4 initializer), scales per output channel
  or per group of 64/128/... consecutive k (``[N, K/g]``). The kernel does not sign-extend the
  nibbles: ``byte << 4`` and ``byte & 0xF0`` read as int8 are 16x the low and the high code, so
  unpacking is two integer ops per byte and the 1/16 is folded into the weight scale at packing
  (exact: a power of two). INT2/INT3 codes (bits <= 4) use the same container.

FP8 attention (issue 9): :func:`fp8_attention` is a flash-attention forward on E4M3 Q, K, V (per-row
Q/K scales, per-channel V scales, P in E4M3 at the fixed scale 1/448 against the online softmax's
running max) with its torch reference ``_fp8_attention_ref``; ``backends/attention.py`` routes
diffusers' SDPA calls to it (docs/kernels.md, "FP8 attention").

Autotuning: every GEMM kernel is ``triton.autotune``-d over a short config list keyed on
``(M, N, K)`` (and the flags that change the kernel), so each shape is tuned once per process at
its first call (a few configs x ~0.1 s); compiled binaries go to Triton's on-disk cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``) and, where this Triton supports
``cache_results``, the tuning result too, so a later process skips both. ``warm_up(shapes)``
tunes a model's shapes ahead of time (e.g. during ``adatsq build`` preparation).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os

import torch

from ..passes.quant import FP8_MAX, QuantizedWeight, pack_int4, quantize_weight, unpack_int4

try:  # import-gated: a CPU machine without triton imports this module and uses the torch path
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # older layout
        from triton.language.extra.cuda import libdevice
    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = tl = libdevice = None
    HAVE_TRITON = False

try:
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAVE_TMA = HAVE_TRITON
except Exception:  # pragma: no cover
    TensorDescriptor = None
    HAVE_TMA = False


class KernelUnavailable(RuntimeError):
    """The Triton path was asked for where it cannot run (no triton, no CUDA, old GPU)."""


# ============================================================================ packed weights
@dataclasses.dataclass(frozen=True)
class PackedInt8Weight:
    """W8A8: int8 codes ``[N, K]`` (K contiguous) and per-channel float32 scales ``[N]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]

    def to(self, device) -> "PackedInt8Weight":
        return _to(self, device)


@dataclasses.dataclass(frozen=True)
class PackedFP8Weight:
    """FP8 W8A8: float8_e4m3fn ``[N, K]`` and per-channel float32 scales ``[N]``."""

    data: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scales[:, None]

    def to(self, device) -> "PackedFP8Weight":
        return _to(self, device)


@dataclasses.dataclass(frozen=True)
class PackedInt4Weight:
    """W4A8 / W4A16: ``pack_int4`` bytes ``[N, K/2]`` (uint8), scales ``[N, K/g]`` float32
    (``[N, 1]`` per channel); ``kernel_scales`` are ``scales / 16`` (see the module doc)."""

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int | None
    n: int
    k: int
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def kernel_scales(self) -> torch.Tensor:
        return self.scales / 16.0

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed, (self.n, self.k))

    def dequantize(self) -> torch.Tensor:
        return QuantizedWeight(self.codes(), self.scales, 4, self.group_size, (self.n, self.k)).dequantize()

    def to(self, device) -> "PackedInt4Weight":
        return _to(self, device)


def _to(pw, device):
    kw = {f.name: getattr(pw, f.name) for f in dataclasses.fields(pw)}
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return type(pw)(**kw)


def _bias(bias, n):
    if bias is None:
        return None
    bias = bias.detach().reshape(-1).float().contiguous()
    if bias.numel() != n:
        raise ValueError(f"bias has {bias.numel()} values for {n} output channels")
    return bias


def _as_quantized(weight, bits: int, group_size: int | None) -> QuantizedWeight:
    if isinstance(weight, QuantizedWeight):
        if len(weight.shape) != 2:
            raise ValueError(f"kernels take 2-D weights [N, K], got shape {weight.shape}")
        return weight
    weight = weight.detach()
    if weight.dim() != 2:
        raise ValueError(f"kernels take 2-D weights [N, K], got shape {tuple(weight.shape)}")
    return quantize_weight(weight, bits, group_size)


def pack_w8a8(weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> PackedInt8Weight:
    """A float weight ``[N, K]`` (quantized here with ``quantize_weight(w, 8)``: per channel, RTN)
    or an 8-bit per-channel :class:`QuantizedWeight` (e.g. from GPTQ) -> the INT8 kernel layout."""
    q = _as_quantized(weight, 8, None)
    if q.bits != 8 or q.group_size is not None:
        raise ValueError(f"pack_w8a8 needs 8-bit per-channel codes, got {q.bits} bits, group {q.group_size}")
    n = q.codes.shape[0]
    return PackedInt8Weight(q.codes.contiguous(), q.scales.reshape(n).float().contiguous(), _bias(bias, n))


def pack_fp8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedFP8Weight:
    """A float weight ``[N, K]`` -> FP8 E4M3 with one scale per output channel
    (``data * scale`` equals ``fake_quant_weight_fp8(weight)`` in float32)."""
    if isinstance(weight, QuantizedWeight) or weight.dim() != 2:
        raise ValueError("pack_fp8 takes a float weight [N, K]")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    data = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
    return PackedFP8Weight(data, scale.reshape(-1).contiguous(), _bias(bias, w.shape[0]))


def pack_w4(weight: torch.Tensor | QuantizedWeight, group_size: int | None = None,
            bias: torch.Tensor | None = None) -> PackedInt4Weight:
    """A float weight ``[N, K]`` (quantized here with ``quantize_weight(w, 4, group_size)``) or a
    :class:`QuantizedWeight` of at most 4 bits -> the INT4 layout of W4A8 and W4A16.

    The kernels take ``group_size`` None (per channel) or a multiple of 64 (64, 128, ...)."""
    q = _as_quantized(weight, 4, group_size)
    if q.bits > 4:
        raise ValueError(f"pack_w4 needs codes of at most 4 bits, got {q.bits}")
    n, k = q.codes.shape
    if k % 2:
        raise ValueError(f"pack_w4 needs an even input size, got {k}")
    g = q.group_size
    if g is not None and (g % 64 or k % g):
        raise ValueError(f"pack_w4: group size {g} must be a multiple of 64 dividing {k}")
    packed = pack_int4(q.codes).reshape(n, k // 2).contiguous()
    return PackedInt4Weight(packed, q.scales.reshape(n, -1).float().contiguous(), g, n, k, _bias(bias, n))


# ============================================================================ torch reference
def _quantize_tokens_ref(x2: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x2.float()
    amax = torch.maximum(xf.amax(dim=1, keepdim=True), xf.amin(dim=1, keepdim=True).neg())
    if fp8:
        scale = amax.clamp_min(1e-12) / FP8_MAX
        codes = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        scale = amax.clamp_min(1e-12) / 127
        codes = (xf / scale).round().clamp(-128, 127).to(torch.int8)
    return codes, scale.reshape(-1)


def _int_mm_ref(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact integer product ``a @ w^T`` (int8 codes) as float32, via float64."""
    return (a.double() @ w.double().T).float()


def _epilogue_ref(acc, a_scales, w_scales, bias, out_dtype):
    out = acc * a_scales.float()[:, None] if a_scales is not None else acc
    out = out * w_scales.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _w4_ref(x2: torch.Tensor, pw: PackedInt4Weight, act_int8: bool, out_dtype) -> torch.Tensor:
    if act_int8:
        codes, s = _quantize_tokens_ref(x2, fp8=False)
        return _ref_dq_mm(codes.double() * s.double()[:, None], pw, out_dtype)
    return _ref_dq_mm(x2.double(), pw, out_dtype)


def _ref_dq_mm(xq: torch.Tensor, pw, out_dtype) -> torch.Tensor:
    """float64 ``xq @ W^T + b`` with ``W`` a packed weight's dequantized values (any format)."""
    out = (xq @ pw.dequantize().to(xq.device).double().T).float()
    if pw.bias is not None:
        out = out + pw.bias.to(out.device)
    return out.to(out_dtype)


# ============================================================================ Triton kernels
if HAVE_TRITON:

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                           BLOCK_K: tl.constexpr, ROWS: tl.constexpr, FP8: tl.constexpr):
        """One pass per row block: max|x| (float32), scale = max / qmax (IEEE division), codes."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_K)
        rmask = rows < M
        mask = rmask[:, None] & (cols[None, :] < K)
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
        if FP8:
            qmax = tl.full([ROWS], 448.0, tl.float32)
        else:
            qmax = tl.full([ROWS], 127.0, tl.float32)
        scale = tl.math.div_rn(amax, qmax)
        y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [ROWS, BLOCK_K]))
        if FP8:
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            q = y.to(tl.float8e4nv)
        else:
            y = tl.minimum(tl.maximum(libdevice.rint(y), -128.0), 127.0)
            q = y.to(tl.int8)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
        tl.store(s_ptr + rows, scale, mask=rmask)

    @triton.jit
    def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Grouped ordering: GROUP_M row tiles sweep the N tiles together (A and W reuse in L2)."""
        width = GROUP_M * num_pid_n
        group_id = tile_id // width
        first_m = group_id * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % width) % group_rows
        pid_n = (tile_id % width) // group_rows
        return pid_m, pid_n

    @triton.jit
    def _scale_bias(acc, offs_m, offs_n, M, N, as_ptr, ws_ptr, bias_ptr,
                    HAS_ASCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
        out = acc.to(tl.float32)
        if HAS_ASCALE:
            a_s = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
            out = out * a_s[:, None]
        w_s = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = out * w_s[None, :]
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            out = out + b[None, :]
        return out

    # ------------------------------------------------------------------ INT8 GEMM, TMA
    @triton.jit
    def _int8_gemm_tma_kernel(a_desc, b_desc, c_desc, as_ptr, ws_ptr, bias_ptr, M, N, K,
                              HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr):
        """C[M, N] = (A[M, K] . B[N, K]^T) * a_s[m] * w_s[n] (+ bias); int8 operands through TMA
        (out-of-bounds tiles read as zeros), int32 accumulation on the tensor cores; persistent
        variant: one program per SM walks the tiles (the next tile's loads overlap the epilogue)."""
        start = tl.program_id(0)
        num_progs = tl.num_programs(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_pid_m * num_pid_n
        k_tiles = tl.cdiv(K, BLOCK_K)
        tile_c = start - num_progs
        for tile_id in tl.range(start, num_tiles, num_progs, flatten=PERSISTENT):
            pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for ki in range(k_tiles):
                a = a_desc.load([off_m, ki * BLOCK_K])
                b = b_desc.load([off_n, ki * BLOCK_K])
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            # separate counter for the epilogue (keeps the flattened pipeline's stages independent)
            tile_c += num_progs
            pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            out = _scale_bias(acc, offs_m, offs_n, M, N, as_ptr, ws_ptr, bias_ptr, True, HAS_BIAS)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(OUT_DTYPE))

    # ------------------------------------------------------------------ INT8 GEMM, pointers
    @triton.jit
    def _int8_gemm_ptr_kernel(a_ptr, b_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, M, N, K,
                              stride_am, stride_bn, stride_cm,
                              HAS_BIAS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        """The same GEMM with plain pointer loads (any alignment; Triton pipelines them with
        cp.async): the fallback where TMA's 16-byte stride rule does not hold."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
        rn = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + rn.to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = offs_k[None, :] < K - ki * BLOCK_K
                a = tl.load(a_ptrs, mask=kmask, other=0)
                b = tl.load(b_ptrs, mask=kmask, other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        out = _scale_bias(acc, offs_m, offs_n, M, N, as_ptr, ws_ptr, bias_ptr, True, HAS_BIAS)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    # ------------------------------------------------------------------ INT4-weight GEMM
    @triton.jit
    def _w4_gemm_kernel(a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, M, N, K,
                        stride_am, stride_wn, stride_cm, stride_sn,
                        GROUP: tl.constexpr, ACT_INT8: tl.constexpr, SWAP: tl.constexpr,
                        HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        """C = A[M, K] . W^T with W as pack_int4 bytes [N, K/2], unpacked in registers per K tile
        (``byte << 4`` / ``byte & 0xF0`` = 16 x low / high code, interleaved back to k order).
        ACT_INT8: int8 activations (W4A8, int32 accumulation); else bf16/fp16 (W4A16).
        GROUP = 0: per-channel scales in the epilogue; else one scale per GROUP k (GROUP a
        multiple of BLOCK_K), applied per K tile. SWAP computes C^T = W . A^T (the unpacked
        weight as the tensor cores' register operand) and transposes in the epilogue."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < M, offs_m, 0), BLOCK_M), BLOCK_M)
        rn = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_kh = tl.arange(0, BLOCK_K // 2)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + offs_kh[None, :]
        if SWAP:
            if ACT_INT8:
                if GROUP == 0:
                    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
                else:
                    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            if ACT_INT8:
                if GROUP == 0:
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                else:
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                p = tl.load(w_ptrs)
            else:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < K - ki * BLOCK_K, other=0)
                p = tl.load(w_ptrs, mask=offs_kh[None, :] < (K - ki * BLOCK_K) // 2, other=0)
            p32 = p.to(tl.int32)
            lo = (p32 << 4).to(tl.int8)          # 16 * low code (even k)
            hi = (p32 & 0xF0).to(tl.int8)        # 16 * high code (odd k)
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
            if GROUP != 0:
                gs = tl.load(ws_ptr + rn.to(tl.int64) * stride_sn + (ki * BLOCK_K) // GROUP)
            if ACT_INT8:
                if GROUP == 0:
                    if SWAP:
                        acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.int32)
                    else:
                        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
                else:
                    if SWAP:
                        part = tl.dot(w, tl.trans(a), out_dtype=tl.int32)
                        acc += part.to(tl.float32) * gs[:, None]
                    else:
                        part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
                        acc += part.to(tl.float32) * gs[None, :]
            else:
                if GROUP != 0:
                    wf = (w.to(tl.float32) * gs[:, None]).to(a.dtype)
                else:
                    wf = w.to(a.dtype)
                if SWAP:
                    acc = tl.dot(wf, tl.trans(a), acc)
                else:
                    acc = tl.dot(a, tl.trans(wf), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // 2
        if SWAP:
            acc = tl.trans(acc)
        if GROUP == 0:
            out = _scale_bias(acc, offs_m, offs_n, M, N, as_ptr, ws_ptr, bias_ptr, ACT_INT8, HAS_BIAS)
        else:
            out = acc
            if ACT_INT8:
                a_s = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
                out = out * a_s[:, None]
            if HAS_BIAS:
                out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


if HAVE_TRITON:

    @triton.jit
    def _unpack_w4_kernel(p_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr, FP8: tl.constexpr = False):
        """pack_int4 bytes -> codes x 16 in k order, int8 or (``FP8``) float8 E4M3 (the large-M
        W4A8 paths' scratch; -128..112 in steps of 16 are exact in E4M3)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        p = tl.load(p_ptr + offs, mask=offs < n_bytes, other=0).to(tl.int32)
        w = tl.reshape(tl.join((p << 4).to(tl.int8), (p & 0xF0).to(tl.int8)), (2 * BLOCK,))
        if FP8:
            w = w.to(tl.float32).to(tl.float8e4nv)
        offs2 = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + offs2, w, mask=offs2 < 2 * n_bytes)

    @triton.jit
    def _w4_gemv_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, bias_ptr, M, N, K, KB, stride_xm, stride_wn, stride_cm,
                        stride_sn, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
        """W4A16 for a few rows (batch-1 adaLN linears): one program per (BLOCK_N outputs, row),
        the packed bytes read once per row (L2 serves the other rows), float32 products of the
        16x codes and the even/odd inputs of each byte, summed per output (per group with groups:
        times the group's kernel scale), times the channel's kernel scale, plus the bias."""
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_n64 = offs_n.to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kb0 in range(0, KB, BLOCK_KB):  # KB = K / 2 packed bytes a row
            offs_b = kb0 + tl.arange(0, BLOCK_KB)
            bmask = offs_b < KB
            p = tl.load(w_ptr + offs_n64[:, None] * stride_wn + offs_b[None, :],
                        mask=nmask[:, None] & bmask[None, :], other=0).to(tl.int32)
            lo = (p << 4).to(tl.int8).to(tl.float32)
            hi = (p & 0xF0).to(tl.int8).to(tl.float32)
            xe = tl.load(x_ptr + m * stride_xm + 2 * offs_b, mask=bmask, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + m * stride_xm + 2 * offs_b + 1, mask=bmask, other=0.0).to(tl.float32)
            part = lo * xe[None, :] + hi * xo[None, :]
            if GROUP > 0:
                gs = tl.load(ws_ptr + offs_n64[:, None] * stride_sn + (2 * offs_b[None, :]) // GROUP,
                             mask=nmask[:, None] & bmask[None, :], other=0.0)
                part = part * gs
            acc += tl.sum(part, axis=1)
        if GROUP == 0:
            acc = acc * tl.load(ws_ptr + offs_n64 * stride_sn, mask=nmask, other=0.0)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0)
        tl.store(c_ptr + m * stride_cm + offs_n, acc.to(c_ptr.dtype.element_ty), mask=nmask)


# ============================================================================ configs + autotune
def _cfg(bm, bn, bk, warps, stages, group_m=8, **extra):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages, **extra)


#: candidate configs, kept from the H100 sweep in docs/kernels.md (the autotuner picks per shape;
#: a short list keeps first-call tuning at ~0.5 s a shape). 128x256x128 with 8 warps and 3 stages is
#: the fastest INT8 tile at every Flux-dev shape; 4 stages do not fit next to the epilogue tile.
INT8_TMA_CONFIGS = [
    _cfg(128, 256, 128, 8, 3, PERSISTENT=True),
    _cfg(128, 256, 128, 8, 3, PERSISTENT=False),
    _cfg(256, 128, 128, 8, 3, PERSISTENT=True),
    _cfg(128, 128, 128, 8, 4, PERSISTENT=True),
]
INT8_PTR_CONFIGS = [
    _cfg(128, 256, 128, 8, 3),
    _cfg(128, 128, 64, 4, 4),
]
W4A8_CONFIGS = [
    _cfg(128, 128, 128, 8, 4, SWAP=False),  # per channel
    _cfg(128, 128, 128, 8, 4, SWAP=True),   # groups
    _cfg(128, 128, 64, 8, 4, SWAP=False),   # groups of 64
]
W4A16_CONFIGS = [
    _cfg(128, 128, 64, 8, 4, SWAP=False),
    _cfg(128, 128, 64, 8, 4, SWAP=True),
]
#: the W4A16 GEMV (rows <= W4A16_GEMV_MAX_M): outputs per program x packed bytes per K step
#: (untuned guesses, to be swept on the H100: docs/kernels.md)
W4_GEMV_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_KB=128, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, BLOCK_KB=256, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, BLOCK_KB=64, num_warps=4, num_stages=3),
    dict(BLOCK_N=16, BLOCK_KB=512, num_warps=4, num_stages=2),
]


def _to_triton_configs(cfgs, pre_hook=None):
    out = []
    for c in cfgs:
        c = dict(c)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        out.append(triton.Config(c, num_warps=warps, num_stages=stages, pre_hook=pre_hook))
    return out


def _autotune(configs, key, prune=None, pre_hook=None):
    kwargs = dict(configs=_to_triton_configs(configs, pre_hook), key=key)
    if prune is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": prune}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = os.environ.get("ADATSQ_TRITON_TUNE_CACHE", "1") != "0"
    return triton.autotune(**kwargs)


def _tma_block_hook(nargs):
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    nargs["c_desc"].block_shape = [bm, bn]


def _prune_group(configs, named_args, **kwargs):
    g = named_args.get("GROUP", kwargs.get("GROUP", 0))
    keep = [c for c in configs if not g or g % c.kwargs["BLOCK_K"] == 0]
    if not keep:
        raise ValueError(f"no kernel config has a BLOCK_K dividing the group size {g}")
    return keep


@functools.lru_cache(maxsize=None)
def _tuned(name: str):
    if name == "int8_tma":
        return _autotune(INT8_TMA_CONFIGS, ["M", "N", "K", "HAS_BIAS", "OUT_DTYPE"], pre_hook=_tma_block_hook)(
            _int8_gemm_tma_kernel)
    if name == "int8_ptr":
        return _autotune(INT8_PTR_CONFIGS, ["M", "N", "K", "HAS_BIAS", "EVEN_K"])(_int8_gemm_ptr_kernel)
    if name == "w4a8":
        return _autotune(W4A8_CONFIGS, ["M", "N", "K", "GROUP", "HAS_BIAS", "EVEN_K"], prune=_prune_group)(
            _w4_gemm_kernel)
    if name == "w4a16":
        return _autotune(W4A16_CONFIGS, ["M", "N", "K", "GROUP", "HAS_BIAS", "EVEN_K"], prune=_prune_group)(
            _w4_gemm_kernel)
    if name == "w4_gemv":
        return _autotune(W4_GEMV_CONFIGS, ["M", "N", "K", "GROUP", "HAS_BIAS"])(_w4_gemv_kernel)
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ============================================================================ dispatch helpers
def triton_available(device: torch.device | str | None = None, fp8: bool = False) -> bool:
    """Whether the Triton kernels can run on ``device`` (default: the current CUDA device)."""
    if not HAVE_TRITON or not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= ((8, 9) if fp8 else (8, 0))


def _use_triton(t: torch.Tensor, backend: str, fp8: bool = False) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    ok = triton_available(t.device, fp8) if t.is_cuda else False
    if backend == "triton" and not ok:
        why = ("triton is not installed" if not HAVE_TRITON else
               "the tensor is not on a CUDA device" if not t.is_cuda else
               "the GPU is too old (FP8 needs compute capability 8.9+, INT8 8.0+)")
        raise KernelUnavailable(f"the Triton kernels cannot run here: {why}; use backend='torch'")
    return ok


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


_TL_DTYPES = {}
if HAVE_TRITON:
    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ============================================================================ public ops
#: the quantization pass: one row a program, one warp per 512 elements of next_pow2(K), at most 16
#: (the fastest of rows 1..8 x warps 4..16 in the H100 sweep; docs/kernels.md)
QUANT_ELEMS = 1
QUANT_ELEMS_PER_WARP = 512


def _quantize_rows_triton(x2: torch.Tensor, fp8: bool, rows: int | None = None, warps: int | None = None):
    m, k = x2.shape
    codes = torch.empty((m, k), device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scales = torch.empty((m,), device=x2.device, dtype=torch.float32)
    if m == 0:
        return codes, scales
    block_k = triton.next_power_of_2(k)
    if rows is None:
        rows = max(1, min(16, QUANT_ELEMS // block_k))
    if warps is None:
        warps = max(1, min(16, block_k * rows // QUANT_ELEMS_PER_WARP))
    _quant_rows_kernel[(triton.cdiv(m, rows),)](x2, codes, scales, m, k, x2.stride(0), codes.stride(0),
                                                BLOCK_K=block_k, ROWS=rows, FP8=fp8, num_warps=warps)
    return codes, scales


def quantize_tokens_int8(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token INT8 quantization of ``x [..., K]`` -> (codes ``[M, K]`` int8, float32
    scales ``[M]``) with ``M = x.numel() / K``; ``codes * scales[:, None]`` equals
    ``fake_quant_tokens(x.float(), 8)`` exactly."""
    x2 = x.reshape(-1, x.shape[-1])
    if _use_triton(x2, backend):
        return _quantize_rows_triton(x2 if x2.stride(-1) == 1 else x2.contiguous(), fp8=False)
    return _quantize_tokens_ref(x2, fp8=False)


def quantize_tokens_fp8(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 E4M3 quantization -> (float8_e4m3fn ``[M, K]``, float32 scales ``[M]``);
    ``codes.float() * scales[:, None]`` equals ``fake_quant_tokens_fp8(x.float())`` exactly."""
    x2 = x.reshape(-1, x.shape[-1])
    if _use_triton(x2, backend, fp8=True):
        return _quantize_rows_triton(x2 if x2.stride(-1) == 1 else x2.contiguous(), fp8=True)
    return _quantize_tokens_ref(x2, fp8=True)


def _tma_ok(*tensors) -> bool:
    if not HAVE_TMA:
        return False
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def int8_gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              backend: str = "auto", impl: str = "auto") -> torch.Tensor:
    """``(a_codes @ w_codes^T) * a_scales[:, None] * w_scales[None, :] (+ bias)`` in ``out_dtype``:
    int8 ``[M, K]`` and ``[N, K]`` codes, float32 scales ``[M]`` and ``[N]``; int32 accumulation.
    ``impl`` ('auto', 'tma', 'ptr') picks the Triton kernel (TMA needs 16-byte aligned rows)."""
    m, k = a_codes.shape
    n, k2 = w_codes.shape
    if k != k2 or a_codes.dtype != torch.int8 or w_codes.dtype != torch.int8:
        raise ValueError(f"int8_gemm needs int8 [M, K] and [N, K] codes, got {a_codes.dtype} {tuple(a_codes.shape)} "
                         f"and {w_codes.dtype} {tuple(w_codes.shape)}")
    a_scales = a_scales.reshape(-1).float().contiguous()
    w_scales = w_scales.reshape(-1).float().contiguous()
    bias = None if bias is None else bias.reshape(-1).float().contiguous()
    if not _use_triton(a_codes, backend):
        return _epilogue_ref(_int_mm_ref(a_codes, w_codes), a_scales, w_scales, bias, out_dtype)
    a_codes = a_codes if a_codes.stride(-1) == 1 else a_codes.contiguous()
    w_codes = w_codes if w_codes.stride(-1) == 1 else w_codes.contiguous()
    out = torch.empty((m, n), device=a_codes.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(_epilogue_ref(torch.zeros((m, n), device=out.device), a_scales, w_scales, bias, out_dtype))
    bias_arg = bias if bias is not None else w_scales
    use_tma = impl == "tma" or (impl == "auto" and _tma_ok(a_codes, w_codes, out))
    if use_tma:
        kern = _tuned("int8_tma")
        dummy = [64, 64]  # the autotuner's pre-hook sets each config's block shape
        a_desc = TensorDescriptor(a_codes, list(a_codes.shape), list(a_codes.stride()), dummy)
        b_desc = TensorDescriptor(w_codes, list(w_codes.shape), list(w_codes.stride()), dummy)
        c_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), dummy)
        nsm = _num_sms(out.device.index if out.device.index is not None else torch.cuda.current_device())

        def grid(meta):
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            return (min(nsm, tiles) if meta["PERSISTENT"] else tiles,)

        kern[grid](a_desc, b_desc, c_desc, a_scales, w_scales, bias_arg, m, n, k,
                   HAS_BIAS=bias is not None, OUT_DTYPE=_TL_DTYPES[out_dtype])
    else:
        kern = _tuned("int8_ptr")

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        kern[grid](a_codes, w_codes, out, a_scales, w_scales, bias_arg, m, n, k,
                   a_codes.stride(0), w_codes.stride(0), out.stride(0),
                   HAS_BIAS=bias is not None, EVEN_K=k % 256 == 0)
    return out


def _out_dtype(x: torch.Tensor, out_dtype):
    if out_dtype is not None:
        return out_dtype
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def w8a8_linear(x: torch.Tensor, weight: PackedInt8Weight, out_dtype: torch.dtype | None = None,
                backend: str = "auto") -> torch.Tensor:
    """INT8 W8A8 linear: per-token INT8 quantization of ``x [..., K]`` (Triton pass), int8 GEMM with
    the dequantization and bias fused behind it. Equals
    ``fake_quant_tokens(x.float(), 8) @ weight.dequantize().T + bias`` up to float rounding."""
    n, k = weight.shape
    x2 = _rows(x, k)
    codes, scales = quantize_tokens_int8(x2, backend=backend)
    out = int8_gemm(codes, scales, weight.codes, weight.scales, weight.bias, _out_dtype(x, out_dtype),
                    backend=backend)
    return out.reshape(*x.shape[:-1], n)


def fp8_linear(x: torch.Tensor, weight: PackedFP8Weight, out_dtype: torch.dtype | None = None,
               backend: str = "auto") -> torch.Tensor:
    """FP8 E4M3 W8A8 linear: per-token FP8 quantization of ``x`` (Triton pass), then
    ``torch._scaled_mm`` with row-wise (per-token x per-channel) scales on the GPU. Equals
    ``fake_quant_tokens_fp8(x.float()) @ weight.dequantize().T + bias`` up to float rounding."""
    return _fp8_act_linear(x, weight, out_dtype, backend, fp8_gemm)


def _fp8_act_linear(x, weight, out_dtype, backend, gemm):
    """Per-token FP8 quantization of ``x`` (the Triton pass where it runs, else the reference),
    then ``gemm(codes, scales, weight, dtype, backend)``."""
    n, k = weight.shape
    x2 = _rows(x, k)
    dtype = _out_dtype(x, out_dtype)
    triton_ok = _use_triton(x2, backend, fp8=True)
    codes, scales = _quantize_rows_triton(x2, fp8=True) if triton_ok else _quantize_tokens_ref(x2, fp8=True)
    return gemm(codes, scales, weight, dtype, backend="auto" if triton_ok else "torch").reshape(*x.shape[:-1], n)


def fp8_gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, weight: PackedFP8Weight,
             out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """The GEMM of :func:`fp8_linear` on activations already quantized per token (float8_e4m3fn
    ``[M, K]``, float32 scales ``[M]``): ``torch._scaled_mm`` on a GPU that has FP8 (plain torch ops
    and traceable by ``torch.compile``), the float64 reference elsewhere."""
    a_scales = a_scales.reshape(-1).float()
    if backend == "torch" or not fp8_supported(a_codes.device):
        if backend == "triton":
            raise KernelUnavailable("fp8_gemm needs a CUDA GPU with FP8 (compute capability 8.9+)")
        return _ref_dq_mm(a_codes.double() * a_scales.double()[:, None], weight, out_dtype)
    return _scaled_mm_rowwise(a_codes, a_scales, weight, out_dtype)


def fp8_supported(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` FP8 runs on ``device`` (CUDA, compute capability 8.9+)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _scaled_mm_rowwise(a_codes, a_scales, weight: PackedFP8Weight, out_dtype):
    """FP8 GEMM through cuBLASLt with per-row x per-column scales (plain torch ops: traceable)."""
    m, k = a_codes.shape
    pad = (-m) % 16  # cuBLASLt's FP8 GEMM wants the dimensions multiples of 16
    if pad:
        a_codes = torch.cat([a_codes, a_codes.new_zeros((pad, k))])
        a_scales = torch.cat([a_scales, a_scales.new_ones(pad)])
    out = torch._scaled_mm(a_codes, weight.data.t(), scale_a=a_scales[:, None], scale_b=weight.scales[None, :],
                           out_dtype=torch.bfloat16)
    if pad:
        out = out[:m]
    if weight.bias is not None:
        out = out.float() + weight.bias if out_dtype == torch.float32 else out + weight.bias.to(out.dtype)
    return out.to(out_dtype)


def _w4_launch(a, pw: PackedInt4Weight, a_scales, act_int8: bool, out_dtype):
    m, k = a.shape
    n = pw.n
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0:
        return out
    ks = pw.kernel_scales.to(a.device)
    ks = ks.reshape(n) if pw.group_size is None else ks
    bias = pw.bias
    packed = pw.packed.view(torch.int8)
    kern = _tuned("w4a8" if act_int8 else "w4a16")

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kern[grid](a, packed, out, a_scales if a_scales is not None else ks, ks,
               bias if bias is not None else ks, m, n, k,
               a.stride(0), packed.stride(0), out.stride(0), ks.stride(0),
               GROUP=pw.group_size or 0, ACT_INT8=act_int8, HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0)
    return out


#: W4A16 with at most this many rows runs the GEMV kernel (batch-1 adaLN / embedder linears: the
#: packed weight is read once per row instead of padding the rows to a 128-row tensor-core tile)
W4A16_GEMV_MAX_M = 16


def _w4_gemv_launch(x2: torch.Tensor, pw: PackedInt4Weight, out_dtype, config: dict | None = None) -> torch.Tensor:
    """The W4A16 GEMV on ``x2 [M, K]`` (any device Triton runs on, its interpreter included);
    ``config`` (BLOCK_N, BLOCK_KB, num_warps, num_stages) skips the autotuner."""
    m, k = x2.shape
    n = pw.n
    out = torch.empty((m, n), device=x2.device, dtype=out_dtype)
    if m == 0:
        return out
    ks = pw.kernel_scales.to(x2.device).reshape(n, -1).contiguous()
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    bias = pw.bias
    args = (x2, pw.packed.view(torch.int8), out, ks, bias if bias is not None else ks, m, n, k, k // 2,
            x2.stride(0), pw.packed.stride(0), out.stride(0), ks.stride(0))
    flags = dict(GROUP=pw.group_size or 0, HAS_BIAS=bias is not None)
    if config is not None:
        c = dict(config)
        bn = c["BLOCK_N"]
        _w4_gemv_kernel[(triton.cdiv(n, bn), m)](*args, **flags, **c)
    else:
        _tuned("w4_gemv")[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)](*args, **flags)
    return out


def _unpack_w4_launch(weight: PackedInt4Weight, fp8: bool) -> torch.Tensor:
    out = torch.empty((weight.n, weight.k), device=weight.packed.device,
                      dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    nb = weight.packed.numel()
    block = 4096
    _unpack_w4_kernel[(triton.cdiv(nb, block),)](weight.packed, out, nb, BLOCK=block, FP8=fp8, num_warps=8)
    return out


def unpack_w4_fp8(weight: PackedInt4Weight) -> torch.Tensor:
    """The INT4 codes x 16 as a float8_e4m3fn ``[N, K]`` tensor (exact: -128..112 in steps of 16);
    with ``weight.kernel_scales`` it is an FP8 weight of the same values (one memory-bound Triton
    pass on the GPU)."""
    if weight.packed.is_cuda and HAVE_TRITON:
        return _unpack_w4_launch(weight, fp8=True)
    return (weight.codes().float() * 16).to(torch.float8_e4m3fn)


def unpack_w4_int8(weight: PackedInt4Weight) -> torch.Tensor:
    """The INT4 codes x 16 as an int8 ``[N, K]`` tensor (one memory-bound Triton pass on the GPU);
    with ``weight.kernel_scales`` it is an INT8 weight of the same values."""
    if weight.packed.is_cuda and HAVE_TRITON:
        return _unpack_w4_launch(weight, fp8=False)
    return (weight.codes().to(torch.int16) * 16).to(torch.int8)


#: W4A8 per channel from this many tokens on: unpack the INT4 weight to an int8 scratch and run the
#: INT8 GEMM (the unpack pass costs ~N*K*1.5 bytes of traffic, small next to a compute-bound GEMM);
#: below it the fused kernel unpacks inside the K loop (the weight bytes dominate there).
W4A8_UNPACK_MIN_M = 1024


def w4a8_linear(x: torch.Tensor, weight: PackedInt4Weight, out_dtype: torch.dtype | None = None,
                backend: str = "auto", impl: str = "auto") -> torch.Tensor:
    """INT4-weight x INT8-activation linear (INT8 tensor-core math, int32 accumulation per group).
    Equals ``fake_quant_tokens(x.float(), 8) @ weight.dequantize().T + bias`` up to float rounding.
    ``impl``: 'fused' (unpack in the GEMM's K loop), 'unpack' (per-channel only: unpack pass + INT8
    GEMM) or 'auto' (``unpack`` for per-channel weights from ``W4A8_UNPACK_MIN_M`` tokens)."""
    n, k = weight.shape
    x2 = _rows(x, k)
    dtype = _out_dtype(x, out_dtype)
    if not _use_triton(x2, backend):
        return _w4_ref(x2, weight, True, dtype).reshape(*x.shape[:-1], n)
    codes, scales = _quantize_rows_triton(x2, fp8=False)
    return w4a8_gemm(codes, scales, weight, dtype, backend=backend, impl=impl).reshape(*x.shape[:-1], n)


def w4a8_gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, weight: PackedInt4Weight,
              out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto", impl: str = "auto") -> torch.Tensor:
    """The GEMM of :func:`w4a8_linear` on activations already quantized per token (int8 codes
    ``[M, K]``, float32 scales ``[M]``, e.g. by :func:`quantize_tokens_int8` or by ops a compiler
    fused into the layer in front): ``(codes * scales) @ weight.dequantize()^T + bias``."""
    n, k = weight.shape
    if a_codes.dim() != 2 or a_codes.shape[1] != k or a_codes.dtype != torch.int8:
        raise ValueError(f"w4a8_gemm needs int8 codes [M, {k}], got {a_codes.dtype} {tuple(a_codes.shape)}")
    a_scales = a_scales.reshape(-1).float().contiguous()
    if not _use_triton(a_codes, backend):
        return _ref_dq_mm(a_codes.double() * a_scales.double()[:, None], weight, out_dtype)
    a_codes = a_codes if a_codes.stride(-1) == 1 else a_codes.contiguous()
    if impl == "auto":
        impl = "unpack" if weight.group_size is None and a_codes.shape[0] >= W4A8_UNPACK_MIN_M else "fused"
    if impl == "unpack":
        if weight.group_size is not None:
            raise ValueError("the unpack path of w4a8_linear takes per-channel weights only")
        w8 = unpack_w4_int8(weight)
        return int8_gemm(a_codes, a_scales, w8, weight.kernel_scales.reshape(n), weight.bias, out_dtype,
                         backend=backend)
    if impl == "fused":
        return _w4_launch(a_codes, weight, a_scales, True, out_dtype)
    raise ValueError(f"impl must be 'auto', 'fused' or 'unpack', got {impl!r}")


def w4a16_linear(x: torch.Tensor, weight: PackedInt4Weight, out_dtype: torch.dtype | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """INT4 weight-only linear: codes dequantized inside the GEMM, bf16/fp16 activations (a float32
    ``x`` is rounded to bf16 on the Triton path). Equals ``x @ weight.dequantize().T + bias`` up to
    float rounding (see the module doc for groups)."""
    n, k = weight.shape
    x2 = _rows(x, k)
    dtype = _out_dtype(x, out_dtype)
    if not _use_triton(x2, backend):
        return _w4_ref(x2, weight, False, dtype).reshape(*x.shape[:-1], n)
    if x2.dtype not in (torch.bfloat16, torch.float16):
        x2 = x2.to(torch.bfloat16)
    if x2.shape[0] <= W4A16_GEMV_MAX_M:
        return _w4_gemv_launch(x2, weight, dtype).reshape(*x.shape[:-1], n)
    return _w4_launch(x2, weight, None, False, dtype).reshape(*x.shape[:-1], n)


def w4f8_linear(x: torch.Tensor, weight: PackedInt4Weight, out_dtype: torch.dtype | None = None,
                backend: str = "auto") -> torch.Tensor:
    """INT4 weights x per-token FP8 E4M3 activations (FP8 tensor-core math): the W4A8 lattice point
    on the FP8 GEMM, which Hopper runs 1.2-1.4x faster than our INT8 GEMM (docs/kernels.md). Equals
    ``fake_quant_tokens_fp8(x.float()) @ weight.dequantize().T + bias`` up to float rounding.
    Per-channel weights only (``_scaled_mm`` takes one scale per output channel)."""
    return _fp8_act_linear(x, weight, out_dtype, backend, w4f8_gemm)


def w4f8_gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, weight: PackedInt4Weight,
              out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """The GEMM of :func:`w4f8_linear` on FP8 activations already quantized per token: the INT4
    weight expanded to an FP8 scratch (one memory-bound pass; the weight stays INT4 in memory), then
    ``torch._scaled_mm`` with the per-token and per-channel (``kernel_scales``) scales."""
    n, k = weight.shape
    if weight.group_size is not None:
        raise ValueError("w4f8 takes per-channel INT4 weights (pack_w4 with group_size=None)")
    if a_codes.dim() != 2 or a_codes.shape[1] != k or a_codes.dtype != torch.float8_e4m3fn:
        raise ValueError(f"w4f8_gemm needs float8_e4m3fn codes [M, {k}], got {a_codes.dtype} {tuple(a_codes.shape)}")
    a_scales = a_scales.reshape(-1).float()
    if backend == "torch" or not (fp8_supported(a_codes.device) and HAVE_TRITON):
        if backend == "triton":
            raise KernelUnavailable("w4f8_gemm needs triton and a CUDA GPU with FP8 (compute capability 8.9+)")
        return _ref_dq_mm(a_codes.double() * a_scales.double()[:, None], weight, out_dtype)
    w8 = PackedFP8Weight(unpack_w4_fp8(weight), weight.kernel_scales.reshape(n).contiguous(), weight.bias)
    return _scaled_mm_rowwise(a_codes, a_scales, w8, out_dtype)


def warm_up(shapes, device="cuda", formats=("w8a8", "fp8", "w4a8", "w4a16"), group_size=None) -> None:
    """Tune (and compile) the kernels for ``(M, N, K)`` shapes ahead of use; a no-op without the
    Triton path."""
    if not triton_available(device):
        return
    for m, n, k in shapes:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device) * 0.02
        if "w8a8" in formats:
            w8a8_linear(x, pack_w8a8(w))
        if "fp8" in formats and triton_available(device, fp8=True):
            fp8_linear(x, pack_fp8(w))
        if "w4a8" in formats or "w4a16" in formats:
            pw = pack_w4(w, group_size)
            if "w4a8" in formats:
                w4a8_linear(x, pw)
            if "w4a16" in formats:
                w4a16_linear(x, pw)
    torch.cuda.synchronize(device)


# ============================================================================ FP8 attention
# A flash-attention forward (online softmax, one program per (query block, batch x head)) on FP8
# E4M3 operands, written for Hopper (tl.dot on float8e4nv: wgmma). The structure follows the
# Triton fused-attention tutorial (python/tutorials/06-fused-attention.py: exp2 with log2(e)
# folded into the logit scale, K loaded transposed, V in "N-contiguous" layout for FP8 on Hopper,
# whose FP8 wgmma reads both operands K-major); the numerics are issue 9's (passes/quant.py:
# fp8_sdpa) with the changes documented in ``fp8_attention``.

#: head dims the FP8 attention takes (the kernel's tiles hold one whole head row)
FP8_ATTN_HEAD_DIMS = (64, 128)
#: the reference's key-block size: the kernel's numerics are those of ``_fp8_attention_ref`` with
#: ``block_n`` = the BLOCK_N of the config that ran (the online softmax quantizes each block's
#: probabilities against the running max); 128 is the block of the configs expected to win on Hopper
FP8_ATTN_REF_BLOCK_N = 128
_LOG2E = 1.4426950408889634
_LOG2_FP8_MAX = math.log2(FP8_MAX)
_ATTN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: candidate configs of the attention kernel (autotuned per (M, N, HEAD_DIM)); 128 x 128 tiles
#: need 8 warps (the 128 x 128 float32 logits and accumulator in registers)
FP8_ATTN_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
]
#: rows a program of the Q/K quantization pass handles; key rows a program of V's column-amax pass
#: reads (in SUB-row steps); key rows a program of V's quantization pass writes
FP8_ATTN_QUANT_ROWS = 16
FP8_ATTN_V_CHUNK = 256
FP8_ATTN_V_SUB = 32
FP8_ATTN_V_BLOCK = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pinned_attention_config() -> dict | None:
    """``ADATSQ_FP8_ATTN_CONFIG=BLOCK_M,BLOCK_N,num_warps,num_stages`` (e.g. ``128,128,8,3``): run
    that config instead of autotuning (saves the tuning's compilations in a cold process)."""
    spec = os.environ.get("ADATSQ_FP8_ATTN_CONFIG", "").strip()
    if not spec:
        return None
    try:
        bm, bn, warps, stages = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"ADATSQ_FP8_ATTN_CONFIG={spec!r}: expected BLOCK_M,BLOCK_N,num_warps,num_stages") from None
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


if HAVE_TRITON:

    @triton.jit
    def _e4m3_grid(x):
        """``x`` rounded to the nearest float8 E4M3 value (ties to even, saturating at +-448), still
        float32: the next ``.to(tl.float8e4nv)`` is then exact. Used only under Triton's CPU
        interpreter, whose float32 -> fp8 cast mis-rounds where rounding carries into the exponent
        (triton 3.6: 31.1 -> 16 instead of 32); on the GPU the cast (cvt.rn.satfinite) is correct.
        Adding 2^(e + 20) to ``|x|`` in [2^e, 2^(e+1)) leaves float32 a spacing of 2^(e - 3), E4M3's
        (2^-9 below 2^-6: its subnormals)."""
        a = tl.abs(x)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)
        c = ((e + 147) << 23).to(tl.float32, bitcast=True)
        r = tl.minimum((a + c) - c, 448.0)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _attn_quant_rows_kernel(x_ptr, c_ptr, s_ptr, H, N, sxb, sxh, sxn,
                                HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, EXACT_CAST: tl.constexpr):
        """Q or K [B, H, N, D] (any strides, D contiguous) -> E4M3 codes [B, H, N, D] (contiguous) and
        one float32 scale per (b, h, token) row, max|x| / 448 (IEEE division), as ``_quant_rows_kernel``."""
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, HEAD_DIM)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + b * sxb + h * sxh + rows64[:, None] * sxn + cols[None, :], mask=rmask[:, None],
                    other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
        scale = tl.math.div_rn(amax, tl.full([ROWS], 448.0, tl.float32))
        y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [ROWS, HEAD_DIM]))
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if EXACT_CAST:
            y = _e4m3_grid(y)
        bh64 = bh.to(tl.int64)
        tl.store(c_ptr + bh64 * N * HEAD_DIM + rows64[:, None] * HEAD_DIM + cols[None, :], y.to(tl.float8e4nv),
                 mask=rmask[:, None])
        tl.store(s_ptr + bh64 * N + rows, scale, mask=rmask)

    @triton.jit
    def _attn_v_amax_kernel(v_ptr, part_ptr, H, N, svb, svh, svn,
                            HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr):
        """V [B, H, N, D]: max |v| over each CHUNK of key rows, per column -> part [B*H, chunks, D]."""
        chunk = tl.program_id(0)
        bh = tl.program_id(1)
        nchunks = tl.num_programs(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        cols = tl.arange(0, HEAD_DIM)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for r0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, SUB):
            rows = r0 + tl.arange(0, SUB)
            x = tl.load(v_ptr + b * svb + h * svh + rows.to(tl.int64)[:, None] * svn + cols[None, :],
                        mask=(rows < N)[:, None], other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.max(tl.abs(x), axis=0))
        tl.store(part_ptr + (bh.to(tl.int64) * nchunks + chunk) * HEAD_DIM + cols, acc)

    @triton.jit
    def _attn_quant_v_kernel(v_ptr, part_ptr, c_ptr, s_ptr, H, N, NCHUNK, svb, svh, svn,
                             HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, NCHUNK_P2: tl.constexpr,
                             EXACT_CAST: tl.constexpr):
        """V [B, H, N, D] -> E4M3 codes of V^T [B, H, D, N] (contiguous: the key axis is the K axis of
        P @ V, which Hopper's FP8 wgmma wants contiguous) with one float32 scale per (b, h, channel),
        max over the keys of |v| / 448 (from the partial maxima of ``_attn_v_amax_kernel``)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        bh64 = bh.to(tl.int64)
        ch = tl.arange(0, NCHUNK_P2)
        cols = tl.arange(0, HEAD_DIM)
        parts = tl.load(part_ptr + (bh64 * NCHUNK + ch)[:, None] * HEAD_DIM + cols[None, :],
                        mask=(ch < NCHUNK)[:, None], other=0.0)
        amax = tl.maximum(tl.max(parts, axis=0), 1e-12)
        scale = tl.math.div_rn(amax, tl.full([HEAD_DIM], 448.0, tl.float32))
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        x = tl.load(v_ptr + b * svb + h * svh + rows64[:, None] * svn + cols[None, :], mask=rmask[:, None],
                    other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, tl.broadcast_to(scale[None, :], [BLOCK, HEAD_DIM]))
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if EXACT_CAST:
            y = _e4m3_grid(y)
        tl.store(c_ptr + bh64 * HEAD_DIM * N + cols[None, :] * N + rows64[:, None], y.to(tl.float8e4nv),
                 mask=rmask[:, None])
        if pid == 0:
            tl.store(s_ptr + bh64 * HEAD_DIM + cols, scale)

    @triton.jit
    def _fp8_attention_fwd_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, o_ptr,
                                  H, M, N, qk_scale,
                                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svd, sob, soh, som,
                                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EXACT_CAST: tl.constexpr):
        """out[b, h, m] = sum_n P[m, n] V[n] / sum_n P[m, n] on E4M3 operands: Q codes [B, H, M, D],
        K codes [B, H, N, D] (D contiguous), V^T codes [B, H, D, N] (N contiguous); float32 scales per
        Q row (qs [B, H, M]), per K row (ks [B, H, N]) and per V channel (vs [B, H, D]); ``qk_scale``
        = softmax scale x log2(e). Logits in log2 units: s = (Q8 . K8^T) * ks[n] * (qs[m] * qk_scale);
        running max m; P = exp2(s - m + log2(448)) = 448 exp(S - m) in (0, 448], its E4M3 codes the A
        operand of the PV product (FP8 scale 1/448; the row sum l sums the unquantized P, so the 448
        cancels in acc / l); acc = acc * alpha + P8 . V8 (the FP8 product summed apart from the
        running float32 accumulator: Hopper's FP8 MMA accumulates with reduced precision); out =
        acc / l * vs."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        bh64 = bh.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqm + offs_d[None, :]
        if EVEN_M:
            q = tl.load(q_ptrs)
            qrow = tl.load(qs_ptr + bh64 * M + offs_m) * qk_scale
        else:
            q = tl.load(q_ptrs, mask=(offs_m < M)[:, None], other=0.0)
            qrow = tl.load(qs_ptr + bh64 * M + offs_m, mask=offs_m < M, other=1.0) * qk_scale
        kt_ptrs = k_ptr + b * skb + h * skh + offs_n.to(tl.int64)[None, :] * skn + offs_d[:, None]  # [D, BLOCK_N]
        v_ptrs = v_ptr + b * svb + h * svh + offs_d.to(tl.int64)[None, :] * svd + offs_n[:, None]  # [BLOCK_N, D]
        ks_ptrs = ks_ptr + bh64 * N + offs_n
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            if EVEN_N:
                kt = tl.load(kt_ptrs)
                ksc = tl.load(ks_ptrs)
            else:
                nmask = (start_n + offs_n) < N
                kt = tl.load(kt_ptrs, mask=nmask[None, :], other=0.0)
                ksc = tl.load(ks_ptrs, mask=nmask, other=0.0)
            s = tl.dot(q, kt)
            s = (s * ksc[None, :]) * qrow[:, None]
            if not EVEN_N:
                s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - (m_new - 8.807354922057604)[:, None])  # log2(448): P in (0, 448]
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if EXACT_CAST:
                p = _e4m3_grid(p)
            if EVEN_N:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
            m_i = m_new
            kt_ptrs += BLOCK_N * skn
            v_ptrs += BLOCK_N
            ks_ptrs += BLOCK_N
        vs = tl.load(vs_ptr + bh64 * HEAD_DIM + offs_d)
        out = acc / l_i[:, None] * vs[None, :]
        o_ptrs = o_ptr + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * som + offs_d[None, :]
        if EVEN_M:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


#: the attention kernel's mask-free flags, from the config's blocks (triton.heuristics)
_ATTN_EVEN = {"EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0, "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}


@functools.lru_cache(maxsize=None)
def _tuned_fp8_attention():
    """The attention kernel autotuned over FP8_ATTN_CONFIGS per (M, N, HEAD_DIM) (cached like the GEMMs)."""
    return _autotune(FP8_ATTN_CONFIGS, ["M", "N", "HEAD_DIM", "EXACT_CAST"])(
        triton.heuristics(_ATTN_EVEN)(_fp8_attention_fwd_kernel))


@functools.lru_cache(maxsize=None)
def _fp8_attention_even():
    return triton.heuristics(_ATTN_EVEN)(_fp8_attention_fwd_kernel)


# ---------------------------------------------------------------------------- checks
def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str = "fp8_attention") -> None:
    """Clear errors (InputError, a ValueError) for inputs the FP8 attention does not take."""
    from ..errors import InputError

    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{what}: {name} must be 4-D [batch, heads, tokens, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _ATTN_DTYPES:
            raise InputError(f"{what}: {name} has dtype {t.dtype}; it takes bfloat16, float16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"{what}: query, key and value have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise InputError(f"{what}: query, key and value are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise InputError(f"{what}: key {tuple(k.shape)} and value {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise InputError(f"{what}: query {tuple(q.shape)} and key {tuple(k.shape)} must agree in batch, heads and "
                         "head_dim (no GQA)")
    if q.shape[-1] not in FP8_ATTN_HEAD_DIMS:
        raise InputError(f"{what}: head_dim {q.shape[-1]} is not supported (it takes "
                         f"{' or '.join(map(str, FP8_ATTN_HEAD_DIMS))})")
    if k.shape[2] == 0:
        raise InputError(f"{what}: no keys (key has 0 tokens)")


def _check_quantized(q8, qs, k8, ks, vt8, vs) -> tuple[int, int, int, int, int]:
    from ..errors import InputError

    if q8.dim() != 4 or k8.dim() != 4 or vt8.dim() != 4:
        raise InputError("fp8_attention_quantized: codes must be 4-D (q8, k8 [B, H, tokens, D]; vt8 [B, H, D, keys])")
    b, h, m, d = q8.shape
    n = k8.shape[2]
    for name, t in (("q8", q8), ("k8", k8), ("vt8", vt8)):
        if t.dtype != torch.float8_e4m3fn:
            raise InputError(f"fp8_attention_quantized: {name} must be float8_e4m3fn, got {t.dtype}")
    if tuple(k8.shape) != (b, h, n, d) or tuple(vt8.shape) != (b, h, d, n):
        raise InputError(f"fp8_attention_quantized: q8 {tuple(q8.shape)}, k8 {tuple(k8.shape)} and vt8 "
                         f"{tuple(vt8.shape)} do not fit ([B, H, M, D], [B, H, N, D], [B, H, D, N])")
    for name, t, shape in (("qs", qs, (b, h, m)), ("ks", ks, (b, h, n)), ("vs", vs, (b, h, d))):
        if tuple(t.shape) != shape:
            raise InputError(f"fp8_attention_quantized: {name} has shape {tuple(t.shape)}, expected {shape}")
    if d not in FP8_ATTN_HEAD_DIMS:
        raise InputError(f"fp8_attention_quantized: head_dim {d} is not supported (it takes "
                         f"{' or '.join(map(str, FP8_ATTN_HEAD_DIMS))})")
    if n == 0:
        raise InputError("fp8_attention_quantized: no keys (0 tokens)")
    return b, h, m, n, d


# ---------------------------------------------------------------------------- torch reference
def _attn_quant_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, N, D] -> E4M3 codes [B, H, N, D] (contiguous), scales [B, H, N]: per row, as
    ``fake_quant_tokens_fp8`` (plain torch ops: traceable, fused by Inductor)."""
    b, h, n, d = x.shape
    codes, scales = _quantize_tokens_ref(x.reshape(b * h * n, d), fp8=True)
    return codes.reshape(b, h, n, d), scales.reshape(b, h, n)


def _attn_quant_v_ref(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, H, N, D] -> E4M3 codes of V^T [B, H, D, N] (contiguous), scales [B, H, D]: one scale per
    (b, h, channel) over the keys."""
    b, h, n, d = v.shape
    codes, scales = _quantize_tokens_ref(v.transpose(-1, -2).reshape(b * h * d, n), fp8=True)
    return codes.reshape(b, h, d, n), scales.reshape(b, h, d)


def _attn_out(b, h, m, d, dtype, device) -> torch.Tensor:
    """The output [B, H, M, D] laid out as [B, M, H, D] (what diffusers permutes it back to and
    flattens: a view, no copy)."""
    return torch.empty((b, m, h, d), dtype=dtype, device=device).permute(0, 2, 1, 3)


def _fp8_attention_ref(q8, qs, k8, ks, vt8, vs, scale: float, out_dtype, block_n: int | None = FP8_ATTN_REF_BLOCK_N,
                       max_elems: int = 1 << 24) -> torch.Tensor:
    """What the kernel computes, in torch (any device): its float32 arithmetic in its order, the
    Q8 . K8 dot exact (float64), its online softmax with key blocks of ``block_n`` (None: one block,
    i.e. the global row max as in passes/quant.py's ``fp8_sdpa``): the probabilities of each block
    are quantized against the running max after that block, and the block's contribution is
    rescaled by exp2(m_block - m_final) (the product of the kernel's alphas). Queries in chunks of
    at most ``max_elems`` logits."""
    b, h, m, n, d = _check_quantized(q8, qs, k8, ks, vt8, vs)
    dev = q8.device
    bn = n if block_n is None else int(block_n)
    nb = -(-n // bn)
    pad = nb * bn - n
    qk_scale = torch.tensor(scale * _LOG2E, dtype=torch.float32, device=dev)
    l448 = torch.tensor(_LOG2_FP8_MAX, dtype=torch.float32, device=dev)
    kf = k8.to(torch.float64)
    vf = vt8.to(torch.float64).transpose(-1, -2)  # [B, H, N, D]
    ksf = ks.float()
    if pad:
        vf = torch.cat([vf, vf.new_zeros((b, h, pad, d))], dim=2)
    out = _attn_out(b, h, m, d, out_dtype, dev)
    rows = max(1, max_elems // max(1, b * h * (n + pad)))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        dot = (q8[:, :, r0:r1].to(torch.float64) @ kf.transpose(-1, -2)).float()
        s = (dot * ksf[:, :, None, :]) * (qs[:, :, r0:r1].float() * qk_scale)[..., None]
        if pad:
            s = torch.cat([s, s.new_full((b, h, r1 - r0, pad), float("-inf"))], dim=-1)
        s = s.reshape(b, h, r1 - r0, nb, bn)
        mrun = torch.cummax(s.amax(dim=-1), dim=-1).values  # running max after each block
        p = torch.exp2(s - (mrun - l448)[..., None])
        p8 = p.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
        w = torch.exp2(mrun - mrun[..., -1:])[..., None]  # the kernel's alphas since each block
        lsum = (p * w).sum(dim=(-2, -1))
        acc = ((p8 * w).reshape(b, h, r1 - r0, nb * bn).double() @ vf).float()
        out[:, :, r0:r1] = (acc / lsum[..., None] * vs.float()[:, :, None, :]).to(out_dtype)
    return out


# ---------------------------------------------------------------------------- Triton launches
def _attn_quant_rows_triton(x: torch.Tensor, rows: int = FP8_ATTN_QUANT_ROWS):
    b, h, n, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty((b, h, n, d), device=x.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty((b, h, n), device=x.device, dtype=torch.float32)
    if x.numel():
        _attn_quant_rows_kernel[(triton.cdiv(n, rows), b * h)](
            x, codes, scales, h, n, x.stride(0), x.stride(1), x.stride(2),
            HEAD_DIM=d, ROWS=rows, EXACT_CAST=_interpreting(), num_warps=4)
    return codes, scales


def _attn_quant_v_triton(v: torch.Tensor):
    b, h, n, d = v.shape
    v = v if v.stride(-1) == 1 else v.contiguous()
    codes = torch.empty((b, h, d, n), device=v.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty((b, h, d), device=v.device, dtype=torch.float32)
    if not v.numel():
        return codes, scales
    nchunks = triton.cdiv(n, FP8_ATTN_V_CHUNK)
    part = torch.empty((b * h, nchunks, d), device=v.device, dtype=torch.float32)
    _attn_v_amax_kernel[(nchunks, b * h)](v, part, h, n, v.stride(0), v.stride(1), v.stride(2),
                                          HEAD_DIM=d, CHUNK=FP8_ATTN_V_CHUNK, SUB=FP8_ATTN_V_SUB, num_warps=4)
    _attn_quant_v_kernel[(triton.cdiv(n, FP8_ATTN_V_BLOCK), b * h)](
        v, part, codes, scales, h, n, nchunks, v.stride(0), v.stride(1), v.stride(2),
        HEAD_DIM=d, BLOCK=FP8_ATTN_V_BLOCK, NCHUNK_P2=triton.next_power_of_2(nchunks),
        EXACT_CAST=_interpreting(), num_warps=4)
    return codes, scales


def _fp8_attention_launch(q8, qs, k8, ks, vt8, vs, scale: float, out: torch.Tensor, config: dict | None = None):
    """The attention kernel into ``out`` [B, H, M, D] (any strides, D contiguous); ``config``
    (BLOCK_M, BLOCK_N, num_warps, num_stages) skips the autotuner."""
    b, h, m, d = q8.shape
    n = k8.shape[2]
    q8 = q8 if q8.stride(-1) == 1 else q8.contiguous()
    k8 = k8 if k8.stride(-1) == 1 else k8.contiguous()
    vt8 = vt8 if vt8.stride(-1) == 1 else vt8.contiguous()
    qs, ks, vs = (t.float().contiguous() for t in (qs, ks, vs))
    if m == 0 or b * h == 0:
        return out
    config = config if config is not None else _pinned_attention_config()
    with _kernel_errors("the FP8 attention kernel"):
        return _fp8_attention_run(q8, qs, k8, ks, vt8, vs, scale, out, config)


class _kernel_errors:
    """Re-raises a Triton compilation/launch failure (an unsupported GPU or triton version, no config
    that fits) as :class:`KernelUnavailable` naming the kernel, the device and the cause."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, KernelUnavailable) or not isinstance(exc, Exception):
            return False
        try:
            dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        except Exception:  # noqa: BLE001 - a broken context: the cause below says more
            dev = "the CUDA device"
        ver = getattr(triton, "__version__", "?") if HAVE_TRITON else "not installed"
        raise KernelUnavailable(f"{self.what} failed on {dev} (triton {ver}): {type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}; "
                                "backend='torch' runs the reference (or leave the attention to the stock "
                                "SDPA)") from exc


def _fp8_attention_run(q8, qs, k8, ks, vt8, vs, scale, out, config):
    b, h, m, d = q8.shape
    n = k8.shape[2]
    args = (q8, k8, vt8, qs, ks, vs, out, h, m, n, float(scale) * _LOG2E,
            q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
            vt8.stride(0), vt8.stride(1), vt8.stride(2), out.stride(0), out.stride(1), out.stride(2))
    if config is not None:
        c = dict(config)
        _fp8_attention_even()[(triton.cdiv(m, c["BLOCK_M"]), b * h)](
            *args, HEAD_DIM=d, EXACT_CAST=_interpreting(), **c)
    else:
        _tuned_fp8_attention()[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), b * h)](
            *args, HEAD_DIM=d, EXACT_CAST=_interpreting())
    return out


def fp8_attention_block_n() -> int | None:
    """The BLOCK_N the attention kernel ran with in this process (the pinned config's, else the
    autotuner's pick; None before the first tuned call): the reference's ``block_n`` that equals it."""
    pinned = _pinned_attention_config()
    if pinned is not None:
        return pinned["BLOCK_N"]
    if not HAVE_TRITON:
        return None
    best = getattr(_tuned_fp8_attention(), "best_config", None)
    return best.kwargs["BLOCK_N"] if best is not None else None


def _fp8_attention_gpu_ok(t: torch.Tensor, backend: str) -> bool:
    """Whether the Triton path runs (FP8: CUDA, compute capability 8.9+, triton); ``backend='triton'``
    where it cannot is a KernelUnavailable naming why."""
    return _use_triton(t, backend, fp8=True)


# ---------------------------------------------------------------------------- public ops
def quantize_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto"):
    """The FP8 operands of :func:`fp8_attention`: ``(q8, qs, k8, ks, vt8, vs)`` with Q and K as E4M3
    codes ``[B, H, tokens, D]`` (contiguous) and one float32 scale per (batch, head, token) row
    (max|row| / 448), and V as the E4M3 codes of V^T ``[B, H, D, N]`` (contiguous) with one scale
    per (batch, head, channel) (max over the keys / 448). ``codes * scales`` equals
    ``fake_quant_tokens_fp8`` of the rows (of V^T's rows) bit for bit (Triton or torch)."""
    _check_attention(q, k, v, "quantize_attention_fp8")
    if _fp8_attention_gpu_ok(q, backend):
        with _kernel_errors("the FP8 attention's quantization passes"):
            q8, qs = _attn_quant_rows_triton(q)
            k8, ks = _attn_quant_rows_triton(k)
            vt8, vs = _attn_quant_v_triton(v)
    else:
        q8, qs = _attn_quant_rows_ref(q)
        k8, ks = _attn_quant_rows_ref(k)
        vt8, vs = _attn_quant_v_ref(v)
    return q8, qs, k8, ks, vt8, vs


def fp8_attention_quantized(q8, qs, k8, ks, vt8, vs, scale: float, out_dtype: torch.dtype = torch.bfloat16,
                            backend: str = "auto", block_n: int | None = FP8_ATTN_REF_BLOCK_N,
                            config: dict | None = None) -> torch.Tensor:
    """The attention of :func:`fp8_attention` on operands from :func:`quantize_attention_fp8` (or
    from compiled torch ops computing the same): ``[B, H, M, D]`` in ``out_dtype``, laid out as
    ``[B, M, H, D]``. ``backend='torch'`` (or where the Triton path cannot run) is the reference
    with key blocks of ``block_n`` (None: one block, the global row max); ``config`` pins the
    kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of autotuning."""
    b, h, m, n, d = _check_quantized(q8, qs, k8, ks, vt8, vs)
    if out_dtype not in _ATTN_DTYPES:
        raise ValueError(f"fp8_attention_quantized: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if not _fp8_attention_gpu_ok(q8, backend):
        return _fp8_attention_ref(q8, qs, k8, ks, vt8, vs, scale, out_dtype, block_n)
    out = _attn_out(b, h, m, d, out_dtype, q8.device)
    return _fp8_attention_launch(q8, qs, k8, ks, vt8, vs, scale, out, config)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """FP8 E4M3 attention (no mask, no dropout, not causal): ``softmax(Q K^T * scale) V`` for
    ``q [B, H, M, D]``, ``k, v [B, H, N, D]`` (bfloat16, float16 or float32; D = 64 or 128; any
    strides with D contiguous), ``scale`` default ``D ** -0.5``; the output ``[B, H, M, D]`` in the
    input's dtype (laid out as ``[B, M, H, D]``).

    Numerics (issue 9's simulation, passes/quant.py ``fp8_sdpa``, with two changes):

    * Q and K: E4M3 with one scale per (batch, head, token) row (max|row| / 448), as fp8_sdpa;
      the scales multiply the exact FP8 dot's float32 result (with the softmax scale);
    * V: E4M3 with one scale per (batch, head, **channel**) (max over the keys / 448) instead of
      per key row: a per-key scale varies along the K axis of P @ V and cannot leave the product,
      a per-channel one is one multiply of the output (and E4M3 is a float: its relative rounding
      error does not depend on the scale over a 2^15 range, so per-channel loses nothing measurable);
    * P = exp(S - m) with ``m`` the **running** row max of the online softmax after each key
      block (fp8_sdpa: the global row max), in E4M3 at the fixed scale 1/448; the row sums (of
      the unquantized P) and the normalisation in float32. A block seen before the row's max is
      quantized against a smaller max, i.e. at most as coarsely (the same 3-bit relative rounding,
      less underflow), then rescaled in float32: the result equals the global-max one up to the
      FP8 rounding of P (tests/test_fp8_attention.py bounds the difference).

    ``backend``: 'triton' (CUDA, compute capability 8.9+), 'torch' (the reference, any device:
    ``_fp8_attention_ref`` with key blocks of ``FP8_ATTN_REF_BLOCK_N``), 'auto' (Triton where it
    runs). The kernel equals the reference run with its config's BLOCK_N up to float32 rounding
    (summation order, exp2) and the rare FP8 rounding flip that causes."""
    _check_attention(q, k, v)
    b, h, m, d = q.shape
    sm = float(scale) if scale is not None else d ** -0.5
    ops = quantize_attention_fp8(q, k, v, backend=backend)
    return fp8_attention_quantized(*ops, scale=sm, out_dtype=q.dtype, backend=backend)
