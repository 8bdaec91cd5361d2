"""backends/kernels.py: packing helpers and the torch reference path (CPU, always run) and the
Triton kernels against the reference ops (``gpu``: skipped without CUDA + triton).

Inputs are random and non-zero; GPU outputs are allocated over NaN-poisoned memory so an
unwritten tile shows up as a NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adatsq.backends import kernels as K
from adatsq.passes.quant import (fake_quant_tokens, fake_quant_tokens_fp8, fake_quant_weight_fp8, pack_int4,
                                 quantize_weight)


def _x(m, k, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, :3] *= 8  # a few outlier channels, as in transformer activations
    return x.to(device=device, dtype=dtype)


def _w(n, k, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(device)


def _rel(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed)"
    return float((out - ref).abs().max() / ref.abs().max())


# ============================================================================ CPU: packing
def test_module_imports_without_triton_and_reports_it():
    assert isinstance(K.HAVE_TRITON, bool)
    if not K.HAVE_TRITON:
        assert not K.triton_available()


def test_pack_w8a8_matches_quantize_weight():
    w = _w(48, 160)
    pw = K.pack_w8a8(w, bias=torch.arange(48.0))
    q = quantize_weight(w, 8)
    assert pw.codes.dtype == torch.int8 and pw.codes.is_contiguous() and pw.shape == (48, 160)
    assert torch.equal(pw.codes, q.codes)
    assert torch.equal(pw.scales, q.scales.reshape(-1))
    assert torch.equal(pw.dequantize(), q.dequantize())
    assert torch.equal(pw.bias, torch.arange(48.0))
    # a QuantizedWeight (e.g. from GPTQ, with the extra negative code) passes through unchanged
    q2 = quantize_weight(w, 8)
    codes = q2.codes.clone()
    codes[0, 0] = -128
    q2 = type(q2)(codes, q2.scales, 8, None, q2.shape)
    assert torch.equal(K.pack_w8a8(q2).codes, codes)


def test_pack_w8a8_rejects_groups_and_other_bits():
    w = _w(8, 128)
    with pytest.raises(ValueError, match="per-channel"):
        K.pack_w8a8(quantize_weight(w, 8, 64))
    with pytest.raises(ValueError, match="8-bit"):
        K.pack_w8a8(quantize_weight(w, 4))
    with pytest.raises(ValueError, match="bias"):
        K.pack_w8a8(w, bias=torch.zeros(7))


@pytest.mark.parametrize("group", [None, 64, 128])
def test_pack_w4_is_pack_int4_of_the_codes(group):
    w = _w(24, 256, seed=3)
    pw = K.pack_w4(w, group)
    q = quantize_weight(w, 4, group)
    assert pw.packed.dtype == torch.uint8 and pw.packed.shape == (24, 128)
    assert torch.equal(pw.packed.reshape(-1), pack_int4(q.codes))  # ONNX INT4 byte order
    assert torch.equal(pw.codes(), q.codes)
    assert torch.equal(pw.scales, q.scales)
    assert pw.scales.shape == (24, 1 if group is None else 256 // group)
    assert torch.equal(pw.dequantize(), q.dequantize())
    assert torch.equal(pw.kernel_scales * 16, pw.scales)


def test_unpack_w4_int8_reference():
    pw = K.pack_w4(_w(8, 64))
    assert torch.equal(K.unpack_w4_int8(pw).to(torch.int32), pw.codes().to(torch.int32) * 16)


def test_unpack_w4_fp8_reference_is_exact():
    """Every 16x INT4 code (-128..112 in steps of 16) is exact in E4M3: the FP8 scratch of w4f8
    holds the same weight as the INT8 one."""
    pw = K.pack_w4(_w(8, 64))
    w8 = K.unpack_w4_fp8(pw)
    assert w8.dtype == torch.float8_e4m3fn
    assert torch.equal(w8.float(), pw.codes().float() * 16)
    every = torch.arange(-8, 8, dtype=torch.float32) * 16
    assert torch.equal(every.to(torch.float8_e4m3fn).float(), every)


def test_pack_w4_nibble_trick_is_16x_the_codes():
    """What the kernel computes from each byte: ``byte << 4`` and ``byte & 0xF0`` as int8."""
    codes = torch.arange(-8, 8).repeat(2).reshape(2, 16).to(torch.int8)
    codes[1] = codes[1].flip(0)
    packed = pack_int4(codes).view(torch.int8).to(torch.int32)
    lo = ((packed << 4) & 0xFF).to(torch.uint8).view(torch.int8)
    hi = (packed & 0xF0).to(torch.uint8).view(torch.int8)
    inter = torch.stack([lo, hi], dim=1).reshape(-1)
    assert torch.equal(inter.to(torch.int32), codes.reshape(-1).to(torch.int32) * 16)


def test_pack_w4_accepts_low_bit_quantized_weights_and_rejects_bad_groups():
    w = _w(16, 192)
    q3 = quantize_weight(w, 3)
    pw = K.pack_w4(q3)
    assert torch.equal(pw.codes(), q3.codes)
    with pytest.raises(ValueError, match="at most 4 bits"):
        K.pack_w4(quantize_weight(w, 8))
    with pytest.raises(ValueError, match="multiple of 64"):
        K.pack_w4(w, 96)
    with pytest.raises(ValueError, match="2-D"):
        K.pack_w4(torch.randn(4, 4, 4))


def test_pack_fp8_matches_fake_quant_weight_fp8():
    w = _w(40, 96, seed=5)
    pf = K.pack_fp8(w)
    assert pf.data.dtype == torch.float8_e4m3fn and pf.scales.shape == (40,)
    assert torch.equal(pf.dequantize(), fake_quant_weight_fp8(w))


# ============================================================================ CPU: reference ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_tokens_int8_reference_matches_fake_quant(dtype):
    x = _x(37, 200, dtype=dtype)
    codes, scales = K.quantize_tokens_int8(x)
    assert codes.dtype == torch.int8 and scales.shape == (37,)
    assert torch.equal(codes.float() * scales[:, None], fake_quant_tokens(x.float(), 8))
    assert int(codes.abs().max()) == 127  # the max-|x| element of each row maps to +-127


def test_quantize_tokens_fp8_reference_matches_fake_quant():
    x = _x(19, 96, seed=2, dtype=torch.bfloat16)
    codes, scales = K.quantize_tokens_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.float() * scales[:, None], fake_quant_tokens_fp8(x.float()))


def test_int8_gemm_reference_is_exact_integer_math():
    g = torch.Generator().manual_seed(7)
    a = torch.randint(-128, 128, (33, 4096), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (20, 4096), generator=g, dtype=torch.int8)
    a[0] = -128  # |sum| up to 2^26: beyond float32's exact integers
    w[0] = -128
    sa = torch.rand(33, generator=g) + 0.5
    sw = torch.rand(20, generator=g) + 0.5
    bias = torch.randn(20, generator=g)
    out = K.int8_gemm(a, sa, w, sw, bias=bias, out_dtype=torch.float32)
    exact = a.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T
    assert exact[0, 0] == 128 * 128 * 4096
    ref = torch.from_numpy(exact).float() * sa[:, None] * sw[None, :] + bias
    assert torch.equal(out, ref)
    assert K.int8_gemm(a, sa, w, sw).dtype == torch.bfloat16


def test_w8a8_linear_reference_matches_fake_quant_matmul():
    x = _x(2 * 9, 192, seed=4).reshape(2, 9, 192)
    w = _w(64, 192)
    bias = torch.randn(64)
    out = K.w8a8_linear(x, K.pack_w8a8(w, bias))
    assert out.shape == (2, 9, 64) and out.dtype == torch.float32
    ref = fake_quant_tokens(x.float(), 8).double() @ quantize_weight(w, 8).dequantize().double().T + bias.double()
    assert _rel(out, ref) < 1e-6
    # the quantization is real: it differs from the float matmul
    assert _rel(out, x.double() @ w.double().T + bias.double()) > 1e-4


@pytest.mark.parametrize("group", [None, 64])
def test_w4_linears_reference_match_fake_quant_matmul(group):
    x = _x(21, 256, seed=6)
    w = _w(40, 256, seed=8)
    pw = K.pack_w4(w, group)
    deq = quantize_weight(w, 4, group).dequantize().double()
    out8 = K.w4a8_linear(x, pw)
    assert _rel(out8, fake_quant_tokens(x.float(), 8).double() @ deq.T) < 1e-6
    out16 = K.w4a16_linear(x.to(torch.bfloat16), pw)
    assert out16.dtype == torch.bfloat16
    assert _rel(out16, x.to(torch.bfloat16).double() @ deq.T) < 2 ** -8


def test_fp8_linear_reference_matches_fake_quant_matmul():
    x = _x(13, 128, seed=9)
    w = _w(24, 128, seed=10)
    out = K.fp8_linear(x, K.pack_fp8(w, bias=torch.ones(24)))
    ref = fake_quant_tokens_fp8(x).double() @ fake_quant_weight_fp8(w).double().T + 1
    assert _rel(out, ref) < 1e-6


def test_w4f8_linear_reference_matches_fake_quant_matmul():
    x = _x(13, 128, seed=11)
    w = _w(24, 128, seed=12)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(3))
    out = K.w4f8_linear(x, K.pack_w4(w, None, bias))
    ref = fake_quant_tokens_fp8(x).double() @ quantize_weight(w, 4).dequantize().double().T + bias.double()
    assert _rel(out, ref) < 1e-6
    assert _rel(out, x.double() @ w.double().T + bias.double()) > 1e-3  # the quantization is real
    with pytest.raises(ValueError, match="per-channel"):
        K.w4f8_linear(x, K.pack_w4(w, 64))
    with pytest.raises(ValueError, match="float8_e4m3fn codes"):
        K.w4f8_gemm(torch.zeros(2, 128, dtype=torch.int8), torch.ones(2), K.pack_w4(w))


def test_backend_argument():
    x = _x(4, 64)
    pw = K.pack_w8a8(_w(8, 64))
    with pytest.raises(ValueError, match="backend"):
        K.w8a8_linear(x, pw, backend="cuda")
    with pytest.raises(K.KernelUnavailable, match="backend='torch'"):
        K.w8a8_linear(x, pw, backend="triton")  # CPU tensor: never the Triton path
    assert torch.equal(K.w8a8_linear(x, pw, backend="torch"), K.w8a8_linear(x, pw))
    with pytest.raises(ValueError, match="features"):
        K.w8a8_linear(_x(4, 32), pw)


# ============================================================================ GPU: Triton kernels
def _needs_triton_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not K.HAVE_TRITON:
        pytest.skip("needs triton")


def _poison(m, n, dtype):
    t = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    del t


#: (M, N, K): ragged M, N not a multiple of the tile, K not a multiple of BLOCK_K (but of 16)
GPU_SHAPES = [(1, 256, 256), (77, 384, 512), (300, 200, 320), (1024, 512, 1024), (4097, 1024, 768)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 64), (77, 3072), (300, 320), (129, 15360)])
def test_gpu_quantize_tokens_match_reference_bitwise(m, k, dtype):
    _needs_triton_gpu()
    x = _x(m, k, seed=m + k, dtype=dtype, device="cuda")
    codes, scales = K.quantize_tokens_int8(x, backend="triton")
    rc, rs = K.quantize_tokens_int8(x.cpu(), backend="torch")
    assert torch.equal(scales.cpu(), rs)
    assert torch.equal(codes.cpu(), rc)
    if K.triton_available(fp8=True):
        fc, fs = K.quantize_tokens_fp8(x, backend="triton")
        rfc, rfs = K.quantize_tokens_fp8(x.cpu(), backend="torch")
        assert torch.equal(fs.cpu(), rfs)
        assert torch.equal(fc.cpu().view(torch.uint8), rfc.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["tma", "ptr"])
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_gpu_int8_gemm_matches_exact_reference(m, n, k, impl):
    _needs_triton_gpu()
    if impl == "tma" and not K.HAVE_TMA:
        pytest.skip("this triton has no host tensor descriptors")
    g = torch.Generator().manual_seed(m * n + k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8).cuda()
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).cuda()
    sa = (torch.rand(m, generator=g) + 0.5).cuda()
    sw = (torch.rand(n, generator=g) + 0.5).cuda() * 1e-4
    bias = torch.randn(n, generator=g).cuda()
    for out_dtype in (torch.float32, torch.bfloat16):
        _poison(m, n, out_dtype)
        out = K.int8_gemm(a, sa, w, sw, bias=bias, out_dtype=out_dtype, backend="triton", impl=impl)
        ref = K.int8_gemm(a.cpu(), sa.cpu(), w.cpu(), sw.cpu(), bias=bias.cpu(), out_dtype=torch.float32,
                          backend="torch")
        assert out.dtype == out_dtype
        if out_dtype == torch.float32:  # int32 exact; one float32 rounding of |acc| > 2^24
            torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
        else:  # plus the final bf16 rounding
            torch.testing.assert_close(out.cpu().float(), ref, rtol=2 ** -8, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_gpu_w8a8_linear_matches_fake_quant_reference(m, n, k):
    _needs_triton_gpu()
    x = _x(m, k, seed=n, dtype=torch.bfloat16, device="cuda")
    w = _w(n, k, device="cuda")
    bias = torch.randn(n, device="cuda")
    pw = K.pack_w8a8(w, bias)
    _poison(m, n, torch.float32)
    out = K.w8a8_linear(x, pw, out_dtype=torch.float32, backend="triton")
    # the reference quantizes on the CPU: CUDA's tensor / scalar multiplies by the reciprocal, which
    # moves some codes across a rounding boundary on large inputs (the kernel divides, IEEE)
    ref = (fake_quant_tokens(x.float().cpu(), 8).double() @ quantize_weight(w.cpu(), 8).dequantize().double().T
           + bias.double().cpu())
    assert _rel(out, ref) < 1e-6
    out_bf16 = K.w8a8_linear(x, pw, backend="triton")
    assert out_bf16.dtype == torch.bfloat16 and _rel(out_bf16, ref) < 2 ** -8


@pytest.mark.gpu
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("m,n,k", [s for s in GPU_SHAPES if s[2] % 128 == 0] + [(50, 256, 320)])
def test_gpu_w4a8_and_w4a16_match_reference(m, n, k, group):
    _needs_triton_gpu()
    if group is not None and k % group:
        group = 64
    x = _x(m, k, seed=n + 1, dtype=torch.bfloat16, device="cuda")
    w = _w(n, k, seed=2, device="cuda")
    bias = torch.randn(n, device="cuda")
    pw = K.pack_w4(w, group, bias)
    deq = quantize_weight(w, 4, group).dequantize().double()
    ref = fake_quant_tokens(x.float().cpu(), 8).double() @ deq.cpu().T + bias.double().cpu()  # on the CPU (above)
    for impl in ("fused", "unpack") if group is None else ("fused",):
        _poison(m, n, torch.float32)
        out = K.w4a8_linear(x, pw, out_dtype=torch.float32, backend="triton", impl=impl)
        assert _rel(out, ref) < (1e-6 if group is None else 1e-5), impl
    _poison(m, n, torch.float32)
    out16 = K.w4a16_linear(x, pw, out_dtype=torch.float32, backend="triton")
    ref16 = x.double() @ deq.T + bias.double()
    # per channel: exact bf16 x code products, float32 sums; groups: weights rounded to bf16
    assert _rel(out16, ref16) < (1e-5 if group is None else 4e-3)


def _fp8_gpu_case(m, n, k, seed):
    """Inputs of the FP8 GPU tests (skipped without FP8): bf16 x [m, k], weight [n, k], bias [n]."""
    _needs_triton_gpu()
    if not K.triton_available(fp8=True):
        pytest.skip("FP8 needs compute capability 8.9+")
    return (_x(m, k, seed=seed, dtype=torch.bfloat16, device="cuda"), _w(n, k, seed=seed + 1, device="cuda"),
            torch.randn(n, device="cuda"))


def _assert_fp8_close(out, ref, m, n):
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # bf16 output rounding (~1.7e-3 in norm) plus the FP8 tensor cores' limited-precision partial
    # sums: at Flux-dev shapes 2.0e-3 in norm and up to 1.5e-2 of max |ref| on single elements
    err = out.double().cpu() - ref.cpu()
    assert float(err.norm() / ref.norm()) < 4e-3
    assert _rel(out, ref) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (77, 384, 512), (1024, 512, 1024)])
def test_gpu_fp8_linear_matches_reference(m, n, k):
    x, w, bias = _fp8_gpu_case(m, n, k, seed=3)
    out = K.fp8_linear(x, K.pack_fp8(w, bias), backend="triton")
    ref = fake_quant_tokens_fp8(x.float()).double() @ fake_quant_weight_fp8(w).double().T + bias.double()
    _assert_fp8_close(out, ref, m, n)


@pytest.mark.gpu
def test_gpu_kernels_match_cpu_runtime():
    """The GPU path and the CPU runtime (reference ops) give the same layer outputs."""
    _needs_triton_gpu()
    x = _x(64, 512, seed=11, dtype=torch.bfloat16)
    w = _w(256, 512, seed=12)
    for pack, fn in ((K.pack_w8a8, K.w8a8_linear), (lambda w: K.pack_w4(w, 128), K.w4a8_linear)):
        pw = pack(w)
        cpu = fn(x.float(), pw, out_dtype=torch.float32)
        gpu = fn(x.cuda(), pw.to("cuda"), out_dtype=torch.float32)
        assert _rel(gpu, cpu) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 16, 17])
@pytest.mark.parametrize("group", [None, 64])
def test_gpu_w4a16_gemv_rows_match_reference(m, group):
    """Up to W4A16_GEMV_MAX_M rows take the GEMV kernel (17 the tensor-core GEMM): both equal the
    reference; the GEMV sums exact float32 products, so it is within float32 rounding even with groups."""
    _needs_triton_gpu()
    n, k = 1000, 3072 + 64  # N not a multiple of any BLOCK_N; K/2 not a multiple of any BLOCK_KB
    x = _x(m, k, seed=m, dtype=torch.bfloat16, device="cuda")
    w = _w(n, k, seed=5, device="cuda")
    bias = torch.randn(n, device="cuda")
    pw = K.pack_w4(w, group, bias)
    ref = x.double() @ quantize_weight(w, 4, group).dequantize().double().T + bias.double()
    _poison(m, n, torch.float32)
    out = K.w4a16_linear(x, pw, out_dtype=torch.float32, backend="triton")
    gemv = m <= K.W4A16_GEMV_MAX_M
    assert _rel(out, ref) < (1e-5 if gemv or group is None else 4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (77, 384, 512), (1024, 512, 1024), (4608, 3072, 3072)])
def test_gpu_w4f8_linear_matches_reference(m, n, k):
    x, w, bias = _fp8_gpu_case(m, n, k, seed=7)
    pw = K.pack_w4(w, None, bias)
    assert torch.equal(K.unpack_w4_fp8(pw).float().cpu(), pw.codes().float().cpu() * 16)
    out = K.w4f8_linear(x, pw, backend="triton")
    ref = fake_quant_tokens_fp8(x.float()).double() @ quantize_weight(w, 4).dequantize().double().T + bias.double()
    _assert_fp8_close(out, ref, m, n)  # as fp8_linear: bf16 output, FP8 tensor-core sums


def test_triton_kernels_in_the_interpreter():
    """The GEMV and the FP8 unpack kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, a
    subprocess: the flag must be set before the kernels are defined) against the reference ops.
    Skipped where triton is not installed (CI); a machine with triton runs it without a GPU:
    ``pip install --target /tmp/t triton==3.6.0 numpy==2.3.5; PYTHONPATH=/tmp/t pytest -k interpreter``."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (pip install triton: runs in its CPU interpreter)")
    if tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4):
        # triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses
        pytest.skip("Triton's interpreter needs numpy < 2.4 (e.g. PYTHONPATH with numpy 2.3)")
    script = """
import torch
from adatsq.backends import kernels as K
from adatsq.passes.quant import quantize_weight
assert K.HAVE_TRITON
g = torch.Generator().manual_seed(0)
for group in (None, 64):
    for m, n, k in ((1, 70, 256), (3, 40, 320)):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        w = torch.randn(n, k, generator=g) * 0.05
        pw = K.pack_w4(w, group, torch.randn(n, generator=g))
        ref = x.double() @ quantize_weight(w, 4, group).dequantize().double().T + pw.bias.double()
        for cfg in K.W4_GEMV_CONFIGS:
            out = K._w4_gemv_launch(x, pw, torch.float32, config=cfg)
            err = float((out.double() - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, (group, m, n, k, cfg, err)
pw = K.pack_w4(torch.randn(24, 128, generator=g))
for fp8 in (False, True):
    out = K._unpack_w4_launch(pw, fp8=fp8)
    assert torch.equal(out.float(), pw.codes().float() * 16), fp8
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
