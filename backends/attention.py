"""FP8 attention in the PyTorch/CUDA runtime (issue 9).

:func:`use_fp8_attention` routes ``torch.nn.functional.scaled_dot_product_attention`` -- what
diffusers' native attention backend calls (``attention_dispatch._native_attention``, the default
backend of ``FluxAttnProcessor``) -- to :func:`fp8_sdpa`, which runs the FP8 attention of
:func:`adatsq.backends.kernels.fp8_attention` where it applies and the stock SDPA everywhere else:

* **applies**: 4-D ``[B, H, tokens, D]`` query/key/value of one dtype (bf16, fp16, fp32) and device,
  D = 64 or 128, as many query as key/value heads, no mask, no dropout, not causal, no gradient
  needed (the kernel is forward-only), and a device that runs it: a CUDA GPU with FP8 (compute
  capability 8.9+, triton) -- the Triton kernel -- or the CPU -- its torch reference (the CPU
  runtime computes the kernel's numerics, as for the linears);
* **falls back** (stock SDPA, unchanged numerics) otherwise, e.g. a masked call or an older GPU.

Under ``torch.compile`` the attention is the custom op ``adatsq::fp8_attention`` (opaque to the
compiler, with a fake implementation for tracing) on operands quantized by plain torch ops in front
of it (``quantize='compiled'``, the default: Inductor fuses the per-row Q/K quantization into the
RoPE/norm kernels that produce them, and V's per-channel one into the projection's epilogue), or
``adatsq::fp8_sdpa`` on the 16-bit inputs, which quantizes with the Triton passes inside
(``quantize='kernel'``). Eager calls always use the Triton passes. Both ops return the output laid
out as ``[B, tokens, H, D]`` (diffusers permutes it back and flattens the heads: no copy).

The swap is process-wide (not thread-safe), like ``passes.quant.fp8_attention`` (the CPU
simulation of the same numerics with the global row max and per-row V scales). Other diffusers
attention backends (flash, sage, ...) do not call the function and are not affected.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import kernels

#: the stock SDPA (the builtin, immune to swaps of ``F.scaled_dot_product_attention``)
_STOCK_SDPA = torch._C._nn.scaled_dot_product_attention
#: how a compiled call quantizes: 'compiled' (torch ops in front of the op) or 'kernel' (Triton
#: passes inside the op); set by :func:`use_fp8_attention`
_QUANTIZE = "compiled"
QUANTIZE_MODES = ("compiled", "kernel")
#: FP8 attention calls run (eager calls and the ops' executions; a compiled graph's calls count when
#: they run): a benchmark's check that the attention did take the FP8 path
CALLS = {"fp8": 0}


def _out_like(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, m, d = q.shape
    return q.new_empty((b, m, h, d), dtype=dtype).permute(0, 2, 1, 3)


@torch.library.custom_op("adatsq::fp8_attention", mutates_args=())
def _fp8_attention_op(q8: torch.Tensor, qs: torch.Tensor, k8: torch.Tensor, ks: torch.Tensor, vt8: torch.Tensor,
                      vs: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`kernels.fp8_attention_quantized` on pre-quantized operands."""
    CALLS["fp8"] += 1
    return kernels.fp8_attention_quantized(q8, qs, k8, ks, vt8, vs, scale, out_dtype)


@_fp8_attention_op.register_fake
def _(q8, qs, k8, ks, vt8, vs, scale, out_dtype):
    return _out_like(q8, out_dtype)


@torch.library.custom_op("adatsq::fp8_sdpa", mutates_args=())
def _fp8_sdpa_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`kernels.fp8_attention` (quantization passes and attention) on 16-bit inputs."""
    CALLS["fp8"] += 1
    return kernels.fp8_attention(query, key, value, scale=scale)


@_fp8_sdpa_op.register_fake
def _(query, key, value, scale):
    return _out_like(query, query.dtype)


@torch.compiler.assume_constant_result
def _device_runs_fp8(device_type: str, index: int) -> bool:
    """Whether the FP8 attention runs on this device (a constant for the compiler)."""
    if device_type == "cpu":
        return True
    if device_type != "cuda":
        return False
    return kernels.triton_available(torch.device("cuda", index) if index >= 0 else None, fp8=True)


def fp8_sdpa_unsupported(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                         enable_gqa: bool = False) -> str | None:
    """Why this SDPA call cannot take the FP8 attention (``None``: it can)."""
    if attn_mask is not None:
        return "an attention mask"
    if dropout_p:
        return "dropout"
    if is_causal:
        return "a causal mask"
    ts = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in ts):
        return "inputs that are not 4-D [batch, heads, tokens, head_dim]"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in kernels._ATTN_DTYPES:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype} (it takes one of bf16, fp16, fp32)"
    if not (query.device == key.device == value.device):
        return "inputs on different devices"
    if query.shape[-1] not in kernels.FP8_ATTN_HEAD_DIMS:
        return f"head_dim {query.shape[-1]} (it takes {kernels.FP8_ATTN_HEAD_DIMS})"
    if key.shape != value.shape or query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
        return f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} (GQA or mismatched)"
    if key.shape[2] == 0:
        return "no keys"
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return "gradients (the FP8 attention is forward-only)"
    dev = query.device
    if not _device_runs_fp8(dev.type, -1 if dev.index is None else dev.index):
        return f"device {dev} (the FP8 kernel needs a CUDA GPU of compute capability 8.9+ and triton)"
    return None


def fp8_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
    """A drop-in ``scaled_dot_product_attention``: the FP8 attention where
    :func:`fp8_sdpa_unsupported` finds nothing against it, the stock SDPA otherwise."""
    if fp8_sdpa_unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) is not None:
        kw = {"enable_gqa": True} if enable_gqa else {}
        return _STOCK_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, **kw)
    sm = float(scale) if scale is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        if _QUANTIZE == "kernel":
            return torch.ops.adatsq.fp8_sdpa(query, key, value, sm)
        q8, qs = kernels._attn_quant_rows_ref(query)
        k8, ks = kernels._attn_quant_rows_ref(key)
        vt8, vs = kernels._attn_quant_v_ref(value)
        return torch.ops.adatsq.fp8_attention(q8, qs, k8, ks, vt8, vs, sm, query.dtype)
    CALLS["fp8"] += 1
    return kernels.fp8_attention(query, key, value, scale=sm)


@contextlib.contextmanager
def use_fp8_attention(quantize: str = "compiled"):
    """Inside: ``torch.nn.functional.scaled_dot_product_attention`` is :func:`fp8_sdpa` (compile
    the model inside it, and run the compiled model inside it too: outside, the stock function
    is back and Dynamo's guards on it recompile). ``quantize``: how compiled calls quantize Q, K
    and V ('compiled': torch ops Inductor fuses into their producers; 'kernel': the Triton passes
    inside the op)."""
    global _QUANTIZE
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"use_fp8_attention: quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    original, before = F.scaled_dot_product_attention, _QUANTIZE
    F.scaled_dot_product_attention = fp8_sdpa
    _QUANTIZE = quantize
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        _QUANTIZE = before
