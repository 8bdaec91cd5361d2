"""Where a GPU kernel test's error comes from: each stage of W8A8 / W4A8 (quantization, GEMM,
epilogue) against its reference on the same inputs as tests/test_kernels.py. Device only:
    PYTHONPATH=/tmp/pkg python3 tools/gpu_diag_kernels.py
"""
import sys

import torch

sys.path.insert(0, ".")
from adatsq.backends import kernels as K  # noqa: E402
from adatsq.passes.quant import fake_quant_tokens, quantize_weight  # noqa: E402
from tests.test_kernels import _rel, _w, _x  # noqa: E402


def main():
    for m, n, k in [(300, 200, 320), (1024, 512, 1024)]:
        x = _x(m, k, seed=n + 1, dtype=torch.bfloat16, device="cuda")
        w = _w(n, k, seed=2, device="cuda")
        bias = torch.randn(n, device="cuda")
        pw = K.pack_w8a8(w, bias)
        q = quantize_weight(w, 8)
        print(f"== {m}x{n}x{k}")
        print("weight codes equal:", torch.equal(pw.codes, q.codes.reshape(n, k).to(pw.codes.dtype)),
              "scales max diff:", float((pw.scales.float() - q.scales.reshape(-1).float()).abs().max()),
              "scales dtype:", pw.scales.dtype, "bias dtype:", None if pw.bias is None else pw.bias.dtype)
        ct, st = K.quantize_tokens_int8(x, backend="triton")
        cr, sr = K.quantize_tokens_int8(x, backend="torch")
        fq = fake_quant_tokens(x.float(), 8)
        fq_cpu = fake_quant_tokens(x.float().cpu(), 8)
        print("fake_quant_tokens cuda vs cpu: elements that differ:", int((fq.cpu() != fq_cpu).sum()),
              "(CUDA's tensor / python scalar multiplies by the reciprocal)")
        print("triton codes*scales vs cpu fake_quant_tokens equal:", torch.equal((ct.float() * st[:, None]).cpu(), fq_cpu))
        print("act codes equal:", torch.equal(ct, cr), "scales equal:", torch.equal(st, sr),
              "codes*scales vs fake_quant_tokens rel:", _rel(ct.float() * st[:, None], fq.double()))
        g_t = K.int8_gemm(ct, st, pw.codes, pw.scales, pw.bias, torch.float32, backend="triton")
        g_r = K.int8_gemm(ct, st, pw.codes, pw.scales, pw.bias, torch.float32, backend="torch")
        print("int8_gemm triton vs torch rel:", _rel(g_t, g_r.double()))
        ref = fq.double() @ q.dequantize().double().T + bias.double()
        print("gemm torch vs fp64 ref rel:", _rel(g_r, ref), "triton vs fp64 ref rel:", _rel(g_t, ref))
        out = K.w8a8_linear(x, pw, out_dtype=torch.float32, backend="triton")
        print("w8a8_linear triton vs ref rel:", _rel(out, ref), "dtype", out.dtype)
        nob = K.int8_gemm(ct, st, pw.codes, pw.scales, None, torch.float32, backend="triton")
        nob_r = K.int8_gemm(ct, st, pw.codes, pw.scales, None, torch.float32, backend="torch")
        print("no-bias triton vs torch rel:", _rel(nob, nob_r.double()))
        ones = torch.ones_like(st)
        raw = K.int8_gemm(ct, ones, pw.codes, torch.ones_like(pw.scales), None, torch.float32, backend="triton")
        raw_r = ct.double() @ pw.codes.double().T
        print("raw integer product triton vs fp64 max abs:", float((raw.double() - raw_r).abs().max()))
        pw4 = K.pack_w4(w, None, bias)
        for impl in ("fused", "unpack"):
            o4 = K.w4a8_linear(x, pw4, out_dtype=torch.float32, backend="triton", impl=impl)
            o4r = K.w4a8_linear(x, pw4, out_dtype=torch.float32, backend="torch")
            print(f"w4a8 {impl} triton vs torch rel:", _rel(o4, o4r.double()))


if __name__ == "__main__":
    main()
