"""The FP8 attention (issue 9): backends/kernels.py ``fp8_attention`` (Triton kernel and torch
reference) and its runtime routing (backends/attention.py).

CPU: the reference against passes/quant.py's ``fp8_sdpa`` (the simulation issue 9 measured) and
exact attention, the online softmax's block-size effect, the API's errors, the SDPA routing eagerly
and under ``torch.compile`` (aot_eager), and the Triton kernels in Triton's CPU interpreter
(skipped without triton). GPU (``gpu``): the kernel against the reference and under Inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adatsq.backends import attention as A
from adatsq.backends import kernels as K
from adatsq.errors import InputError
from adatsq.passes.quant import fake_quant_tokens_fp8, fp8_sdpa


def _qkv(b, h, m, n, d, seed=0, dtype=torch.float32, device="cpu", layout="bnhd"):
    """Random q [B, H, M, D], k, v [B, H, N, D]: logits of a peaked softmax (q, k ~ N(0, 4)), a few
    outlier value tokens; ``layout='bnhd'``: views of [B, tokens, H, D] tensors, as diffusers passes."""
    g = torch.Generator().manual_seed(seed)

    def t(tokens, mult):
        x = torch.randn(b, tokens, h, d, generator=g) * mult
        return x if layout == "bnhd" else x.contiguous()

    q, k, v = t(m, 2.0), t(n, 2.0), t(n, 1.0)
    v[:, :3] *= 8
    out = []
    for x in (q, k, v):
        x = x.to(device=device, dtype=dtype).permute(0, 2, 1, 3)
        out.append(x if layout == "bnhd" else x.contiguous())
    return out


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a - b).norm() / b.norm())


def _exact(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


# ============================================================================ CPU: numerics
def test_quantized_operands_are_fake_quant_rows_bit_for_bit():
    """Q and K per (b, h, token) row, V per (b, h, channel): ``codes * scales`` equal
    ``fake_quant_tokens_fp8`` of those rows exactly; layouts [B, H, N, D] and V^T [B, H, D, N]."""
    q, k, v = _qkv(2, 3, 40, 56, 64, dtype=torch.bfloat16)
    q8, qs, k8, ks, vt8, vs = K.quantize_attention_fp8(q, k, v)
    assert q8.dtype == k8.dtype == vt8.dtype == torch.float8_e4m3fn
    assert q8.shape == (2, 3, 40, 64) and q8.is_contiguous() and qs.shape == (2, 3, 40)
    assert vt8.shape == (2, 3, 64, 56) and vt8.is_contiguous() and vs.shape == (2, 3, 64)
    assert torch.equal(q8.float() * qs[..., None], fake_quant_tokens_fp8(q.float()))
    assert torch.equal(k8.float() * ks[..., None], fake_quant_tokens_fp8(k.float()))
    assert torch.equal(vt8.float() * vs[..., None], fake_quant_tokens_fp8(v.float().transpose(-1, -2)))


def test_reference_with_one_key_block_is_fp8_sdpa_where_v_is_exact():
    """The reference's structure is fp8_sdpa's: with one key block (the global row max) and a V
    that both V schemes quantize exactly (every row and every column holds the max), the two agree
    to float32 rounding (exp2 with log2(e) and log2(448) folded in vs exp)."""
    b, h, n, d = 1, 2, 96, 64
    q, k, _ = _qkv(b, h, n, n, d, seed=3, layout="contiguous")
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 126, (b, h, n, d), generator=g, dtype=torch.uint8)  # finite E4M3 codes
    codes |= torch.randint(0, 2, (b, h, n, d), generator=g, dtype=torch.uint8) << 7
    v = codes.view(torch.float8_e4m3fn).float()
    v[:, :, torch.arange(n), torch.arange(n) % d] = 448.0
    v = v * 2.0 ** -7  # max 3.5: every scale is 3.5 / 448 = 2^-7, so the codes come back exactly
    ops = K.quantize_attention_fp8(q, k, v)
    assert torch.equal(ops[4].float().transpose(-1, -2) * ops[5][:, :, None, :], v)
    one = K.fp8_attention_quantized(*ops, scale=d ** -0.5, out_dtype=torch.float32, backend="torch", block_n=None)
    sim = fp8_sdpa(q, k, v)
    assert _rel(one, sim) < 2e-6
    blocks = K.fp8_attention_quantized(*ops, scale=d ** -0.5, out_dtype=torch.float32, backend="torch", block_n=32)
    assert 1e-4 < _rel(blocks, sim) < 3e-2  # the running max moves some FP8 roundings of P


def test_fp8_attention_error_matches_the_simulation(record_property):
    """On a random case the kernel's numerics (per-channel V, running max) are as close to exact
    attention as fp8_sdpa's (per-row V, global max), and differ from it by the size of FP8 noise."""
    q, k, v = _qkv(1, 4, 256, 256, 128, seed=1)
    exact = _exact(q, k, v)
    ours = K.fp8_attention(q, k, v)
    sim = fp8_sdpa(q, k, v)
    e_ours, e_sim, diff = _rel(ours, exact), _rel(sim, exact), _rel(ours, sim)
    record_property("adatsq:fp8_attention_rel_err_vs_exact", e_ours)
    record_property("adatsq:fp8_sdpa_rel_err_vs_exact", e_sim)
    record_property("adatsq:fp8_attention_rel_diff_vs_fp8_sdpa", diff)
    assert 1e-3 < e_ours < 0.12, e_ours
    assert e_ours < 1.1 * e_sim, (e_ours, e_sim)
    assert diff < 0.6 * e_sim, (diff, e_sim)
    # one key: its P is exactly 448 (the row max's), so the output is that key's FP8 V row
    one = K.fp8_attention(q, k[:, :, :1], v[:, :, :1])
    assert torch.allclose(one, fake_quant_tokens_fp8(v[:, :, :1].transpose(-1, -2)).transpose(-1, -2).expand_as(one),
                          rtol=1e-6, atol=0)


@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_online_softmax_block_size_effect_is_bounded(block_n):
    """The running max vs the global row max: both round each P to E4M3 (half an ulp: 2^-4 of P,
    or 2^-10 of the 1/448 scale below 2^-6), so per element the outputs differ by at most
    (2^-3 + N 2^-9 / 448) max_n |V[n, d]| (l >= 448: the row max's P is 448); in norm by much less."""
    n = 300  # ragged last block
    q, k, v = _qkv(1, 2, 64, n, 64, seed=2)
    ops = K.quantize_attention_fp8(q, k, v)
    run = K.fp8_attention_quantized(*ops, scale=0.125, out_dtype=torch.float32, backend="torch", block_n=block_n)
    glob = K.fp8_attention_quantized(*ops, scale=0.125, out_dtype=torch.float32, backend="torch", block_n=None)
    vmax = (ops[4].float().abs().amax(dim=-1) * ops[5])[:, :, None, :]  # max over keys of |dequantized V|
    bound = (2 ** -3 + n * 2 ** -9 / 448) * vmax * 1.001
    assert ((run - glob).abs() <= bound).all()
    assert _rel(run, glob) < 2e-2
    exact = _exact(q, k, v, scale=0.125)
    assert abs(_rel(run, exact) - _rel(glob, exact)) < 0.1 * _rel(glob, exact)


def test_fp8_attention_api_on_cpu():
    """Shapes, dtypes, layout, the scale argument, fewer queries than keys; the CPU takes the
    reference; backend='triton' there is KernelUnavailable."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, k, v = _qkv(2, 2, 24, 40, 64, seed=5, dtype=dtype)
        out = K.fp8_attention(q, k, v)
        assert out.dtype == dtype and out.shape == (2, 2, 24, 64)
        assert out.permute(0, 2, 1, 3).is_contiguous()  # [B, M, H, D] memory: diffusers' flatten is a view
        assert torch.equal(out, K.fp8_attention(q, k, v, backend="torch"))
        assert _rel(out, _exact(q, k, v)) < 0.12
    q, k, v = _qkv(1, 2, 24, 40, 128, seed=6)
    assert _rel(K.fp8_attention(q, k, v, scale=0.05), _exact(q, k, v, scale=0.05)) < 0.12
    assert torch.equal(K.fp8_attention(q.contiguous(), k.contiguous(), v.contiguous()), K.fp8_attention(q, k, v))
    assert K.fp8_attention(q[:, :, :0], k, v).shape == (1, 2, 0, 128)
    with pytest.raises(K.KernelUnavailable, match="backend='torch'"):
        K.fp8_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        K.fp8_attention(q, k, v, backend="cuda")


def test_fp8_attention_rejects_what_it_cannot_run():
    q, k, v = _qkv(1, 2, 8, 8, 64)
    cases = [
        ((q[0], k, v), "4-D"),
        ((q, k, v.double()), "dtype torch.float64"),
        ((q.to(torch.int32), k, v), "dtype torch.int32"),
        ((q, k.half(), v), "different dtypes"),
        ((q[..., :32], k[..., :32], v[..., :32]), "head_dim 32"),
        ((q, k, v[:, :, :4]), "same shape"),
        ((q, k[:, :1], v[:, :1]), "GQA"),
        ((q, k[:, :, :0], v[:, :, :0]), "no keys"),
    ]
    for args, msg in cases:
        with pytest.raises(InputError, match=msg):
            K.fp8_attention(*args)
    ops = list(K.quantize_attention_fp8(q, k, v))
    with pytest.raises(InputError, match="vt8 must be float8_e4m3fn"):
        K.fp8_attention_quantized(*ops[:4], ops[4].float(), ops[5], scale=0.1)
    with pytest.raises(InputError, match="do not fit"):
        K.fp8_attention_quantized(*ops[:4], ops[4].transpose(-1, -2), ops[5], scale=0.1)
    with pytest.raises(InputError, match="qs has shape"):
        K.fp8_attention_quantized(ops[0], ops[1][..., :3], *ops[2:], scale=0.1)


def test_kernel_failures_become_kernel_unavailable():
    """A Triton compilation or launch failure inside an FP8 attention entry point is a
    KernelUnavailable naming the kernel and the cause (not a crash deep in triton)."""
    with pytest.raises(K.KernelUnavailable,
                       match=r"the FP8 attention kernel failed .*RuntimeError: boom.*backend='torch'"):
        with K._kernel_errors("the FP8 attention kernel"):
            raise RuntimeError("boom\nmore lines")
    with pytest.raises(K.KernelUnavailable, match="^already$"):
        with K._kernel_errors("x"):
            raise K.KernelUnavailable("already")


def test_pinned_attention_config(monkeypatch):
    monkeypatch.setenv("ADATSQ_FP8_ATTN_CONFIG", "128,64,4,3")
    assert K._pinned_attention_config() == dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    assert K.fp8_attention_block_n() == 64
    monkeypatch.setenv("ADATSQ_FP8_ATTN_CONFIG", "128x64")
    with pytest.raises(ValueError, match="BLOCK_M,BLOCK_N,num_warps,num_stages"):
        K._pinned_attention_config()
    monkeypatch.delenv("ADATSQ_FP8_ATTN_CONFIG")
    assert K._pinned_attention_config() is None


def test_e2e_benchmark_attention_variants():
    """benchmarks/gpu_e2e.py: ``fp8-attn`` and ``mixed-fp8-attn`` are ``fp8`` / ``mixed-fp8`` with FP8
    attention; ``--attn-quant`` reaches the child processes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_e2e.py"
    spec = importlib.util.spec_from_file_location("gpu_e2e_attn", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    assert {"fp8-attn", "mixed-fp8-attn"} <= set(e2e.VARIANTS)
    assert e2e.split_variant("mixed-fp8-attn") == ("mixed-fp8", True)
    assert e2e.split_variant("fp8-attn") == ("fp8", True) and e2e.split_variant("mixed") == ("mixed", False)
    assert all(e2e.split_variant(v)[0] in e2e.VARIANTS for v in e2e.VARIANTS)
    import argparse

    args = argparse.Namespace(steps=28, int8_steps=8, warmup=3, reps=10, seed=0, image_tokens=4096, text_tokens=512,
                              plan=None, eager=False, torchao_adaln=False, profile=True, attn_quant="kernel")
    cmd = e2e.child_cmd(args, "fp8-attn", 4, 8)
    assert cmd[cmd.index("--variant") + 1] == "fp8-attn" and cmd[cmd.index("--attn-quant") + 1] == "kernel"
    assert e2e.kernel_category("_fp8_attention_fwd_kernel") == "attention"
    assert e2e.kernel_category("_attn_quant_v_kernel") == "quantization"
    assert e2e.kernel_category("_attn_v_amax_kernel") == "quantization"
    assert e2e.kernel_category("_attn_quant_rows_kernel") == "quantization"


# ============================================================================ CPU: runtime routing
def test_fp8_sdpa_routes_supported_calls_and_falls_back_otherwise():
    q, k, v = _qkv(1, 2, 16, 16, 64, seed=7)
    stock = F.scaled_dot_product_attention
    with A.use_fp8_attention():
        assert F.scaled_dot_product_attention is A.fp8_sdpa
        before = A.CALLS["fp8"]
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), K.fp8_attention(q, k, v))
        assert torch.equal(F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.2),
                           K.fp8_attention(q, k, v, scale=0.2))
        assert A.CALLS["fp8"] == before + 2
        mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) > 0.3
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), stock(q, k, v, attn_mask=mask))
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True), stock(q, k, v, is_causal=True))
        small = [t[..., :16] for t in (q, k, v)]
        assert torch.equal(F.scaled_dot_product_attention(*small), stock(*small))
        gq = q.clone().requires_grad_()
        assert torch.equal(F.scaled_dot_product_attention(gq, k, v), stock(gq, k, v))  # training: stock
        with torch.no_grad():
            assert torch.equal(F.scaled_dot_product_attention(gq, k, v), K.fp8_attention(q, k, v))
        assert A.CALLS["fp8"] == before + 3
    assert F.scaled_dot_product_attention is stock
    assert A.fp8_sdpa_unsupported(q, k, v, dropout_p=0.1) == "dropout"
    assert "device" in A.fp8_sdpa_unsupported(*(t.to("meta") for t in (q, k, v)))
    with pytest.raises(ValueError, match="quantize"):
        with A.use_fp8_attention("int8"):
            pass


def test_fp8_sdpa_compiled_fallback_is_the_stock_sdpa():
    """A call the FP8 path does not take traces to the stock SDPA under torch.compile."""
    q, k, v = _qkv(1, 2, 16, 16, 64, seed=8)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) > 0.3

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) + F.scaled_dot_product_attention(q, k, v)

    torch._dynamo.reset()
    with A.use_fp8_attention():
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    stock = F.scaled_dot_product_attention
    assert torch.allclose(out, stock(q, k, v, attn_mask=mask) + K.fp8_attention(q, k, v), rtol=1e-6, atol=1e-6)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(8, 28, 28))
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(8, 8, 3)
    ids[..., 1] = torch.arange(8)[:, None]
    ids[..., 2] = torch.arange(8)[None, :]
    inputs = dict(hidden_states=torch.randn(1, 64, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    return model.eval(), inputs


@pytest.mark.parametrize("quantize", ["compiled", "kernel"])
def test_diffusers_flux_takes_the_fp8_attention_eagerly_and_compiled(quantize):
    """A diffusers Flux transformer (native attention backend) routes its two attention calls to the
    FP8 attention; under torch.compile (aot_eager: the ops' fake implementations trace) the graph
    calls the custom op and gives the eager numbers; outside the context Dynamo recompiles to the
    stock attention."""
    model, inputs = _tiny_flux()
    op = "adatsq.fp8_attention" if quantize == "compiled" else "adatsq.fp8_sdpa"
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        stock = model(**inputs)[0]
        with A.use_fp8_attention(quantize):
            before = A.CALLS["fp8"]
            eager = model(**inputs)[0]
            assert A.CALLS["fp8"] == before + 2
            compiled = torch.compile(model, backend=backend)
            out = compiled(**inputs)[0]
            assert A.CALLS["fp8"] == before + 4
        assert len(graphs) == 1
        calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and op in str(n.target)]
        assert len(calls) == 2, [str(n.target) for n in graphs[0].graph.nodes]
        # same reference ops eagerly and in the aot_eager graph
        assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
        assert not torch.equal(eager, stock) and _rel(eager, stock) < 1e-2
        assert torch.equal(compiled(**inputs)[0], stock) and len(graphs) == 2


# ============================================================================ Triton interpreter
def test_fp8_attention_kernels_in_the_interpreter():
    """The quantization passes and the attention kernel (every config in FP8_ATTN_CONFIGS, ragged
    query and key blocks, [B, tokens, H, D] input views, D 64 and 128) in Triton's CPU interpreter:
    the codes equal the reference's bit for bit, the attention equals ``_fp8_attention_ref`` with the
    config's BLOCK_N to float32 rounding. The interpreter runs the FP8 dots as float16 x float16
    matmuls with float32 sums (exact products); its float32 -> fp8 cast mis-rounds carries, which
    the kernels sidestep there (``_e4m3_grid``, EXACT_CAST). Skipped without triton, as
    tests/test_kernels.py's interpreter test (e.g. PYTHONPATH=/tmp/tnp:/tmp/tsite: numpy 2.3, triton 3.6)."""
    import importlib.util
    import os
    import subprocess
    import sys

    import numpy as np

    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (pip install triton: runs in its CPU interpreter)")
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton's interpreter needs numpy < 2.4 (e.g. PYTHONPATH with numpy 2.3)")
    script = """
import torch
from adatsq.backends import kernels as K
assert K.HAVE_TRITON and K._interpreting()
g = torch.Generator().manual_seed(0)
for (b, h, m, n, d) in ((1, 2, 80, 96, 64), (2, 1, 33, 130, 128)):
    q, k, v = (torch.randn(b, t, h, d, generator=g).mul(2).to(torch.bfloat16).permute(0, 2, 1, 3)
               for t in (m, n, n))
    q8, qs = K._attn_quant_rows_triton(q)
    rq8, rqs = K._attn_quant_rows_ref(q)
    assert torch.equal(q8.view(torch.uint8), rq8.view(torch.uint8)) and torch.equal(qs, rqs)
    vt8, vs = K._attn_quant_v_triton(v)
    rv8, rvs = K._attn_quant_v_ref(v)
    assert torch.equal(vt8.view(torch.uint8), rv8.view(torch.uint8)) and torch.equal(vs, rvs)
    k8, ks = K._attn_quant_rows_triton(k)
    for cfg in K.FP8_ATTN_CONFIGS:
        for dtype in (torch.float32, torch.float16):  # (the interpreter's bf16 cast mis-rounds carries too)
            out = K._attn_out(b, h, m, d, dtype, "cpu")
            K._fp8_attention_launch(q8, qs, k8, ks, vt8, vs, d ** -0.5, out, config=cfg)
            ref = K._fp8_attention_ref(q8, qs, k8, ks, vt8, vs, d ** -0.5, torch.float32, block_n=cfg["BLOCK_N"])
            err = float((out.double() - ref.double()).abs().max() / ref.abs().max())
            assert err < (1e-6 if dtype == torch.float32 else 2 ** -10), ((b, h, m, n, d), cfg, dtype, err)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ============================================================================ GPU
def _needs_fp8_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not K.triton_available(fp8=True):
        pytest.skip("needs triton and a GPU with FP8 (compute capability 8.9+)")


@pytest.mark.gpu
@pytest.mark.parametrize("b,h,m,n,d", [(1, 2, 96, 96, 64), (2, 3, 200, 333, 128), (1, 24, 1024, 1024, 128),
                                       (1, 4, 4608, 4608, 128)])
def test_gpu_quantization_passes_match_reference_bitwise(b, h, m, n, d):
    _needs_fp8_gpu()
    q, k, v = _qkv(b, h, m, n, d, seed=m + n, dtype=torch.bfloat16, device="cuda")
    got = K.quantize_attention_fp8(q, k, v, backend="triton")
    # the reference on the CPU (IEEE division; as tests/test_kernels.py)
    ref = K.quantize_attention_fp8(q.cpu(), k.cpu(), v.cpu(), backend="torch")
    for name, a, r in zip(("q8", "qs", "k8", "ks", "vt8", "vs"), got, ref):
        a = a.cpu()
        if a.dtype == torch.float8_e4m3fn:
            a, r = a.view(torch.uint8), r.view(torch.uint8)
        assert torch.equal(a, r), name


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", K.FP8_ATTN_CONFIGS,
                         ids=lambda c: "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}".format(**c))
@pytest.mark.parametrize("b,h,m,n,d", [(1, 2, 96, 96, 64), (2, 3, 200, 333, 128), (1, 4, 1024, 1024, 128)])
def test_gpu_attention_kernel_matches_reference(b, h, m, n, d, cfg):
    """Every config against the reference with its BLOCK_N: float32 sums in another order, exp2 on
    the GPU (ex2.approx), the FP8 MMA's reduced-precision partial sums; float32 output."""
    _needs_fp8_gpu()
    q, k, v = _qkv(b, h, m, n, d, seed=m * n, dtype=torch.bfloat16, device="cuda")
    ops = K.quantize_attention_fp8(q, k, v, backend="triton")
    torch.full((b, m, h, d), float("nan"), device="cuda")  # poisoned memory for the output
    out = K._attn_out(b, h, m, d, torch.float32, "cuda")
    K._fp8_attention_launch(*ops, d ** -0.5, out, config=cfg)
    ref = K._fp8_attention_ref(*ops, d ** -0.5, torch.float32, block_n=cfg["BLOCK_N"])
    assert _rel(out, ref) < 2e-3
    assert float((out - ref).abs().max() / ref.abs().max()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp8_attention_at_flux_width(dtype, record_property):
    """fp8_attention (autotuned) at Flux-dev's attention (24 heads x 128, 4608 tokens): equals the
    reference at the tuned BLOCK_N up to the output rounding, and is as close to exact attention as
    the CPU simulation fp8_sdpa (run here on the GPU)."""
    _needs_fp8_gpu()
    q, k, v = _qkv(1, 24, 4608, 4608, 128, seed=9, dtype=dtype, device="cuda")
    out = K.fp8_attention(q, k, v, backend="triton")
    assert out.dtype == dtype and out.permute(0, 2, 1, 3).is_contiguous()
    block_n = K.fp8_attention_block_n()
    assert block_n in (64, 128)
    ops = K.quantize_attention_fp8(q, k, v, backend="triton")
    ref = K._fp8_attention_ref(*ops, 128 ** -0.5, torch.float32, block_n=block_n)
    assert _rel(out, ref) < 5e-3
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    sim = fp8_sdpa(q.float(), k.float(), v.float())
    e_out, e_sim = _rel(out, exact), _rel(sim, exact)
    record_property("adatsq:gpu_fp8_attention_rel_err_vs_fp32", e_out)
    record_property("adatsq:gpu_fp8_sdpa_rel_err_vs_fp32", e_sim)
    assert e_out < 1.2 * e_sim + 5e-3, (e_out, e_sim)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["compiled", "kernel"])
def test_gpu_fp8_attention_under_inductor(quantize):
    """torch.compile (Inductor) of a module calling SDPA inside use_fp8_attention: the graph runs the
    op; its output equals the eager kernel's up to Inductor's division (a code may flip at a tie)."""
    _needs_fp8_gpu()

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q.sin(), k, v).permute(0, 2, 1, 3).flatten(2, 3)

    q, k, v = _qkv(1, 4, 1000, 1000, 128, seed=11, dtype=torch.bfloat16, device="cuda")
    mod = Attn()
    torch._dynamo.reset()
    with torch.no_grad(), A.use_fp8_attention(quantize):
        eager = mod(q, k, v)
        before = A.CALLS["fp8"]
        out = torch.compile(mod)(q, k, v)
        assert A.CALLS["fp8"] == before + 1
    assert out.shape == (1, 1000, 512)
    assert _rel(out, eager) < 2e-3
    assert _rel(out, F.scaled_dot_product_attention(q.sin(), k, v).permute(0, 2, 1, 3).flatten(2, 3)) < 0.1


@pytest.mark.gpu
def test_gpu_fp8_sdpa_falls_back_where_the_kernel_does_not_apply():
    _needs_fp8_gpu()
    q, k, v = _qkv(1, 2, 64, 64, 80, dtype=torch.bfloat16, device="cuda")
    with A.use_fp8_attention():
        before = A.CALLS["fp8"]
        out = F.scaled_dot_product_attention(q, k, v)  # head_dim 80
        mask = torch.ones(64, 64, dtype=torch.bool, device="cuda")
        out2 = F.scaled_dot_product_attention(q[..., :64], k[..., :64], v[..., :64], attn_mask=mask)
        assert A.CALLS["fp8"] == before
    assert torch.equal(out, A._STOCK_SDPA(q, k, v))
    assert torch.equal(out2, A._STOCK_SDPA(q[..., :64], k[..., :64], v[..., :64], attn_mask=mask))
