"""Quantized GEMM kernels vs BF16 ``F.linear`` at Flux-dev's GEMM shapes (GPU only).

    device run (see docs/kernels.md):
      mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq && export PYTHONPATH=/tmp/pkg:$PYTHONPATH
      PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py --json $OUT/gpu_kernels.json [--sweep]

For each shape (M tokens, N outputs, K inputs) it times, with CUDA events around a CUDA graph of
``--inner`` back-to-back calls (launch overhead excluded, as inside a model's queued forward),
median of ``--reps`` replays:

* ``bf16``: ``F.linear(x, W)`` (cuBLAS), the baseline;
* ``int8_gemm``: the Triton INT8 GEMM alone (codes and scales precomputed), dequant epilogue;
* ``quant_int8`` / ``quant_fp8``: the per-token activation quantization pass alone;
* ``w8a8``: quantization + INT8 GEMM (what a W8A8 layer costs);
* ``fp8_mm`` / ``fp8``: ``torch._scaled_mm`` alone / with the FP8 quantization pass;
* ``w4a8`` / ``w4a8_g128``: INT8 quantization + the INT4-weight GEMM (per channel / groups of 128);
  ``w4a8_mm``: the GEMM alone;
* ``w4a16`` / ``w4a16_g128``: the INT4 weight-only GEMM on bf16 activations.

Each kernel's output is compared with the reference ops (float64 on the GPU, from passes/quant.py's
numerics): ``err`` = max |out - ref| / max |ref|. ``--sweep`` also times every candidate config of
each Triton GEMM on its own (the data behind the autotune lists in backends/kernels.py).

Attention (``--shapes attn``: Flux-dev's B=1, H=24, N=4608, D=128; or ``attn:B,H,N,D``), inputs in
diffusers' layout (``[B, N, H, D]`` viewed as ``[B, H, N, D]``), TFLOP/s = 4 B H N^2 D / time:

* ``sdpa_bf16``: ``F.scaled_dot_product_attention`` in BF16 (torch's pick), the baseline;
  ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient``: pinned to one SDPA backend (where it runs);
* ``fp8_attention``: ``kernels.fp8_attention`` (the Q/K/V quantization passes + the FP8 kernel,
  autotuned); ``fp8_attn_kernel``: the kernel alone on pre-quantized operands; ``fp8_attn_quant``:
  the quantization passes alone; ``fp8_attn_cfg*``: each config of ``FP8_ATTN_CONFIGS`` alone.

``err_vs_fp32`` = ||out - SDPA_fp32|| / ||SDPA_fp32||; ``err_vs_ref`` = the same against the
kernel's reference (``_fp8_attention_ref`` at the tuned BLOCK_N).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

from adatsq.backends import kernels as K
from adatsq.passes.quant import (fake_quant_tokens, fake_quant_tokens_fp8, fake_quant_weight_fp8,
                                 quantize_weight)

FLUX_SHAPES = [  # (M tokens, N, K): Flux-dev 1024x1024 (4096 image + 512 text tokens)
    (4608, 3072, 3072),    # attention q/k/v/out projections (double blocks)
    (4608, 12288, 3072),   # MLP up
    (4608, 3072, 12288),   # MLP down
    (4608, 21504, 3072),   # single block: fused qkv + MLP up
    (4608, 3072, 15360),   # single block: fused attention-out + MLP down
]


ADALN_SHAPES = [  # batch 1: Flux-dev's adaLN modulation linears (double / single blocks), W4A16's GEMV
    (1, 18432, 3072),
    (1, 9216, 3072),
]
SMALL_M_SHAPES = [  # few tokens: weight traffic matters (W4A16's case)
    (256, 21504, 3072),
    (256, 3072, 15360),
]
ATTN_SHAPES = [  # (batch, heads, tokens, head_dim): Flux-dev's attention at 1024x1024 (4096 + 512 tokens)
    (1, 24, 4608, 128),
]


def bench(fn, inner: int = 10, reps: int = 20) -> float:
    """Median milliseconds per call: a CUDA graph of ``inner`` calls, replayed ``reps`` times."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream (allocations, autotuning)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / inner)
    del graph
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max())


def norm_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius)."""
    out = out.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def poison_like(shape, dtype):
    """Leave NaNs in the caching allocator's next block of this size (unwritten outputs show)."""
    t = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    del t


# ---------------------------------------------------------------------------------------- sweep
def sweep_configs(m, n, k, a, a_s, w8, pw4, pw4g, x, out_rows):
    """Time every candidate config of each Triton GEMM alone (no autotuner)."""
    out = torch.empty((m, n), device="cuda", dtype=torch.bfloat16)
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    extra_tma = [
        K._cfg(128, 256, 128, 8, 4, PERSISTENT=True),
        K._cfg(128, 256, 128, 8, 2, PERSISTENT=True),
        K._cfg(256, 128, 128, 8, 3, PERSISTENT=False),
        K._cfg(128, 256, 128, 8, 3, group_m=4, PERSISTENT=True),
        K._cfg(128, 256, 128, 8, 3, group_m=16, PERSISTENT=True),
        K._cfg(128, 128, 256, 8, 3, PERSISTENT=True),
        K._cfg(256, 128, 64, 8, 4, PERSISTENT=True),
    ]

    def run_tma(cfg):
        c = dict(cfg)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        ad = K.TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
        bd = K.TensorDescriptor(w8.codes, list(w8.codes.shape), list(w8.codes.stride()), [bn, bk])
        cd = K.TensorDescriptor(out, list(out.shape), list(out.stride()), [bm, bn])
        tiles = -(-m // bm) * -(-n // bn)
        grid = (min(nsm, tiles) if c["PERSISTENT"] else tiles,)
        return lambda: K._int8_gemm_tma_kernel[grid](ad, bd, cd, a_s, w8.scales, w8.scales, m, n, k,
                                                     HAS_BIAS=False, OUT_DTYPE=K.tl.bfloat16,
                                                     num_warps=warps, num_stages=stages, **c)

    def run_ptr(cfg):
        c = dict(cfg)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        grid = (-(-m // c["BLOCK_M"]) * -(-n // c["BLOCK_N"]),)
        return lambda: K._int8_gemm_ptr_kernel[grid](a, w8.codes, out, a_s, w8.scales, w8.scales, m, n, k,
                                                     a.stride(0), w8.codes.stride(0), out.stride(0),
                                                     HAS_BIAS=False, EVEN_K=k % c["BLOCK_K"] == 0,
                                                     num_warps=warps, num_stages=stages, **c)

    def run_w4(cfg, pw, act, act_int8):
        c = dict(cfg)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        grid = (-(-m // c["BLOCK_M"]) * -(-n // c["BLOCK_N"]),)
        ks = pw.kernel_scales
        ks = ks.reshape(-1) if pw.group_size is None else ks
        packed = pw.packed.view(torch.int8)
        return lambda: K._w4_gemm_kernel[grid](act, packed, out, a_s if act_int8 else ks, ks, ks, m, n, k,
                                               act.stride(0), packed.stride(0), out.stride(0), ks.stride(0),
                                               GROUP=pw.group_size or 0, ACT_INT8=act_int8, HAS_BIAS=False,
                                               EVEN_K=k % c["BLOCK_K"] == 0,
                                               num_warps=warps, num_stages=stages, **c)

    for fp8 in (False, True):
        for rows, warps in ((1, 4), (1, 8), (2, 8), (4, 8), (1, 16), (2, 16), (4, 16), (8, 16)):
            row = dict(shape=[m, n, k], kernel="quant_fp8" if fp8 else "quant_int8", config=dict(rows=rows, warps=warps))
            try:
                row["ms"] = bench(lambda: K._quantize_rows_triton(x, fp8, rows, warps), inner=5, reps=10)
                row["gbps"] = m * k * 3 / row["ms"] / 1e6
                print(f"  sweep {row['kernel']} rows {rows} warps {warps}: {row['ms']:.4f} ms {row['gbps']:.0f} GB/s")
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            out_rows.append(row)

    flops = 2.0 * m * n * k
    jobs = [("int8_tma", c, run_tma) for c in K.INT8_TMA_CONFIGS + extra_tma]
    jobs += [("int8_ptr", c, run_ptr) for c in K.INT8_PTR_CONFIGS]
    jobs += [("w4a8", c, lambda c: run_w4(c, pw4, a, True)) for c in K.W4A8_CONFIGS]
    jobs += [("w4a8_g128", c, lambda c: run_w4(c, pw4g, a, True)) for c in K.W4A8_CONFIGS
             if 128 % c["BLOCK_K"] == 0]
    jobs += [("w4a16", c, lambda c: run_w4(c, pw4, x, False)) for c in K.W4A16_CONFIGS]
    jobs += [("w4a16_g128", c, lambda c: run_w4(c, pw4g, x, False)) for c in K.W4A16_CONFIGS]
    for kind, cfg, make in jobs:
        row = dict(shape=[m, n, k], kernel=kind, config=cfg)
        try:
            ms = bench(make(cfg), inner=5, reps=10)
            row.update(ms=ms, tflops=flops / ms / 1e9)
            print(f"  sweep {kind:11s} {cfg}  {ms:.4f} ms  {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
        except Exception as exc:  # a config that does not compile or fit: recorded, not fatal
            row.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            print(f"  sweep {kind:11s} {cfg}  FAILED {row['error'][:160]}", flush=True)
        out_rows.append(row)


# ---------------------------------------------------------------------------------------- main
def timed_row(res, name, fn, args, flops, out_shape, check=None):
    """``res[name]``: ``check(fn())``'s errors (the output written over NaN-poisoned memory of
    ``out_shape``), then ``fn``'s time (and TFLOP/s for ``flops`` > 0); an exception is recorded,
    and the other rows still run."""
    try:
        row = {}
        if check is not None:
            poison_like(out_shape, torch.bfloat16)
            out = fn()
            row.update(check(out))
            del out
        row["ms"] = bench(fn, args.inner, args.reps)
        if flops:
            row["tflops"] = flops / row["ms"] / 1e9
        res[name] = row
    except Exception as exc:  # recorded, the other rows still run
        res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        traceback.print_exc()


def run_shape(m, n, k, args, sweep_rows):
    torch.manual_seed(1000 + n + k)
    flops = 2.0 * m * n * k
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    wb = w.to(torch.bfloat16)
    res = {"shape": [m, n, k], "gflop": flops / 1e9}

    def record(name, fn, ref=None, gemm_flops=True, vs_bf16=False):
        """Check ``fn``'s output against ``ref()`` (over NaN-poisoned memory), then time it."""
        def check(out):
            r = ref()
            row = dict(err=rel_err(out, r), norm_err=norm_err(out, r))
            if vs_bf16:
                row["err_vs_bf16"] = rel_err(out, bf16_out)
            return row

        timed_row(res, name, fn, args, flops if gemm_flops else 0.0, (m, n),
                  check if ref is not None else None)

    record("bf16", lambda: F.linear(x, wb))
    bf16_out = F.linear(x, wb).double()

    # references (float64 on the GPU)
    xq8 = fake_quant_tokens(x.float(), 8).double()
    w8 = K.pack_w8a8(w)
    deq8 = quantize_weight(w, 8).dequantize().double()
    a = a_s = None
    try:
        a, a_s = K.quantize_tokens_int8(x)
        ra, ras = K._quantize_tokens_ref(x.cpu(), fp8=False)  # CPU: torch's CUDA x / scalar is x * (1 / scalar)
        res["quant_int8_code_mismatches"] = int((a.cpu() != ra).sum())
        res["quant_int8_scale_mismatches"] = int((a_s.cpu() != ras).sum())
        del ra, ras
    except Exception as exc:
        res["quant_int8"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        traceback.print_exc()
        a, a_s = K._quantize_tokens_ref(x, fp8=False)
    record("int8_gemm", lambda: K.int8_gemm(a, a_s, w8.codes, w8.scales),
           lambda: ((a.double() @ w8.codes.double().T).float() * a_s[:, None] * w8.scales[None, :]).double())
    record("quant_int8", lambda: K.quantize_tokens_int8(x), gemm_flops=False)
    record("w8a8", lambda: K.w8a8_linear(x, w8), lambda: xq8 @ deq8.T, vs_bf16=True)

    # FP8
    pf = K.pack_fp8(w)
    try:
        fq, fs = K.quantize_tokens_fp8(x)
        rq, rs = K._quantize_tokens_ref(x.cpu(), fp8=True)
        res["quant_fp8_code_mismatches"] = int((fq.cpu().view(torch.uint8) != rq.view(torch.uint8)).sum())
        res["quant_fp8_scale_mismatches"] = int((fs.cpu() != rs).sum())
        del rq, rs
    except Exception as exc:
        res["quant_fp8"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        traceback.print_exc()
        fq, fs = K._quantize_tokens_ref(x, fp8=True)
    record("fp8_mm", lambda: torch._scaled_mm(fq, pf.data.t(), scale_a=fs[:, None], scale_b=pf.scales[None, :],
                                              out_dtype=torch.bfloat16))
    record("quant_fp8", lambda: K.quantize_tokens_fp8(x), gemm_flops=False)
    record("fp8", lambda: K.fp8_linear(x, pf),
           lambda: fake_quant_tokens_fp8(x.float()).double() @ fake_quant_weight_fp8(w).double().T, vs_bf16=True)

    # W4A8 / W4A16, per channel and groups of 128
    for g in (None, 128):
        tag = "" if g is None else f"_g{g}"
        pw = K.pack_w4(w, g)
        deq = quantize_weight(w, 4, g).dequantize().double()
        record("w4a8" + tag, lambda: K.w4a8_linear(x, pw), lambda: xq8 @ deq.T, vs_bf16=True)
        if g is None:
            record("w4a8_fused", lambda: K.w4a8_linear(x, pw, impl="fused"), lambda: xq8 @ deq.T)
            record("w4a8_unpack", lambda: K.w4a8_linear(x, pw, impl="unpack"), lambda: xq8 @ deq.T)
            record("w4_unpack_pass", lambda: K.unpack_w4_int8(pw), gemm_flops=False)
            record("w4f8", lambda: K.w4f8_linear(x, pw),
                   lambda: fake_quant_tokens_fp8(x.float()).double() @ deq.T, vs_bf16=True)
            record("w4_unpack_fp8_pass", lambda: K.unpack_w4_fp8(pw), gemm_flops=False)
            record("w4a8_mm", lambda: K._w4_launch(a, pw, a_s, True, torch.bfloat16),
                   lambda: ((a.double() @ pw.codes().double().T) * a_s.double()[:, None]
                            * pw.scales.double().reshape(1, -1)))
        record("w4a16" + tag, lambda: K.w4a16_linear(x, pw), lambda: x.double() @ deq.T, vs_bf16=True)

    if args.sweep:
        sweep_configs(m, n, k, a, a_s, w8, K.pack_w4(w), K.pack_w4(w, 128), x, sweep_rows)

    base = res["bf16"].get("ms")
    for name, row in res.items():
        if isinstance(row, dict) and "ms" in row and base:
            row["speedup"] = base / row["ms"]
    return res


def run_attention(b, h, n, d, args):
    """FP8 attention vs BF16 SDPA at one shape (see the module doc)."""
    torch.manual_seed(4242 + n)
    flops = 4.0 * b * h * n * n * d
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3) for _ in range(3))
    res = {"attention": [b, h, n, d], "gflop": flops / 1e9}
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).double()

    def record(name, fn, ref=None, count_flops=True):
        def check(out):
            row = dict(err_vs_fp32=norm_err(out, exact), max_err_vs_fp32=rel_err(out, exact))
            if ref is not True:
                row["err_vs_ref"] = norm_err(out, ref)
            return row

        timed_row(res, name, fn, args, flops if count_flops else 0.0, (b * n * h, d),
                  check if ref is not None else None)

    record("sdpa_bf16", lambda: F.scaled_dot_product_attention(q, k, v), ref=True)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION"),
                         ("sdpa_efficient", "EFFICIENT_ATTENTION")):
            if hasattr(SDPBackend, be):
                def pinned(be=be):
                    with sdpa_kernel(getattr(SDPBackend, be)):
                        return F.scaled_dot_product_attention(q, k, v)
                record(name, pinned, ref=True)
    except ImportError:
        pass
    scale = d ** -0.5
    try:
        ops = K.quantize_attention_fp8(q, k, v, backend="triton")
        K.fp8_attention_quantized(*ops, scale=scale, backend="triton")  # tunes
        best = getattr(K._tuned_fp8_attention(), "best_config", None)
        res["fp8_attn_best_config"] = (K._pinned_attention_config() or
                                       (dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
                                        if best is not None else None))
        block_n = K.fp8_attention_block_n() or K.FP8_ATTN_REF_BLOCK_N
        ref = K._fp8_attention_ref(*ops, scale, torch.float32, block_n=block_n).double()
    except Exception as exc:
        res["fp8_attention"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        traceback.print_exc()
        return res
    record("fp8_attention", lambda: K.fp8_attention(q, k, v, backend="triton"), ref=ref)
    record("fp8_attn_kernel", lambda: K.fp8_attention_quantized(*ops, scale=scale, backend="triton"), ref=ref)
    record("fp8_attn_quant", lambda: K.quantize_attention_fp8(q, k, v, backend="triton"), count_flops=False)
    out = K._attn_out(b, h, n, d, torch.bfloat16, "cuda")
    for i, cfg in enumerate(K.FP8_ATTN_CONFIGS):
        record(f"fp8_attn_cfg{i}", lambda cfg=cfg: K._fp8_attention_launch(*ops, scale, out, config=cfg))
        res[f"fp8_attn_cfg{i}"]["config"] = cfg
    base = res["sdpa_bf16"].get("ms")
    for name, row in res.items():
        if isinstance(row, dict) and "ms" in row and base:
            row["speedup"] = base / row["ms"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sweep", action="store_true", help="also time every candidate config alone")
    ap.add_argument("--shapes", default="flux",
                    help="';'-separated: 'flux', 'small', 'adaln', M,N,K, 'attn' (FP8 attention at Flux-dev's "
                         "shape) or attn:B,H,N,D")
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not K.HAVE_TRITON:
        print("needs a CUDA GPU and triton", file=sys.stderr)
        return 2
    shapes, attn_shapes = [], []
    for part in args.shapes.split(";"):
        if part == "attn":
            attn_shapes += ATTN_SHAPES
        elif part.startswith("attn:"):
            attn_shapes.append(tuple(int(v) for v in part[5:].split(",")))
        else:
            shapes += FLUX_SHAPES if part == "flux" else SMALL_M_SHAPES if part == "small" else \
                ADALN_SHAPES if part == "adaln" else [
                tuple(int(v) for v in part.split(","))]
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(0),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": f"CUDA graph of {args.inner} calls, median of {args.reps} replays (CUDA events)",
        "inputs": "x ~ N(0,1) bf16 [M, K]; W ~ N(0, 0.02^2) [N, K]",
    }
    print(json.dumps(meta), flush=True)
    results, sweep_rows = [], []
    for m, n, k in shapes:
        print(f"shape M={m} N={n} K={k}", flush=True)
        res = run_shape(m, n, k, args, sweep_rows)
        results.append(res)
        print(json.dumps(res), flush=True)
        torch.cuda.empty_cache()
        if args.json:  # after every shape: a run cut short still leaves its numbers
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results, "sweep": sweep_rows}, f, indent=1)
    for b, h, n, d in attn_shapes:
        print(f"attention B={b} H={h} N={n} D={d}", flush=True)
        res = run_attention(b, h, n, d, args)
        results.append(res)
        print(json.dumps(res), flush=True)
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results, "sweep": sweep_rows}, f, indent=1)
    names = ["bf16", "int8_gemm", "quant_int8", "w8a8", "fp8_mm", "fp8", "w4a8_mm", "w4a8_fused", "w4a8_unpack",
             "w4a8", "w4a8_g128", "w4f8", "w4a16", "w4a16_g128"]
    print(f"\n{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    print("ms (speed-up vs bf16) [max rel err vs reference]")
    for res in results:
        if "attention" in res:
            b, h, n, d = res["attention"]
            cells = []
            for name in ("sdpa_bf16", "sdpa_flash", "sdpa_cudnn", "fp8_attention", "fp8_attn_kernel",
                         "fp8_attn_quant"):
                r = res.get(name, {})
                if "ms" in r:
                    cell = f"{name} {r['ms']:.3f} ({r.get('speedup', float('nan')):.2f}x"
                    cell += f", {r['tflops']:.0f} TFLOP/s)" if "tflops" in r else ")"
                    if "err_vs_fp32" in r:
                        cell += f" [{r['err_vs_fp32']:.1e}]"
                elif name in res:
                    cell = f"{name} FAILED"
                else:
                    continue
                cells.append(cell)
            print(f"attention {b}x{h}x{n}x{d}: " + "; ".join(cells) + f"; best {res.get('fp8_attn_best_config')}")
            continue
        m, n, k = res["shape"]
        cells = []
        for name in names:
            r = res.get(name, {})
            if "ms" in r:
                cell = f"{name} {r['ms']:.3f} ({r['speedup']:.2f}x)"
                if "err" in r:
                    cell += f" [{r['err']:.1e}]"
            else:
                cell = f"{name} FAILED"
            cells.append(cell)
        print(f"{m}x{n}x{k}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
