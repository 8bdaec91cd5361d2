"""End-to-end step latency and memory of a random-init Flux-dev-width transformer on a GPU (issue 9).

    device run (see docs/kernels.md): diffusers (and torchao, for the peer) travel as wheels
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
      mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/adatsq
      PYTHONPATH=/tmp/site:/tmp/pkg python3 benchmarks/gpu_e2e.py --double 4 --single 8 --json $OUT/e2e.json

A diffusers ``FluxTransformer2DModel`` with Flux-dev's widths (hidden 3072, 24 heads of 128, MLP
12288, T5 width 4096, guidance embedding) and ``--double``/``--single`` blocks (Flux-dev: 19 and
38), random weights (seeded), BF16, batch 1 at 1024x1024: 4096 image tokens + 512 text tokens.
One denoising step (one transformer call) per timing. Variants, each in its own process (fresh
compiler caches, so preparation times are cold; freed memory between variants):

* ``bf16``: ``torch.compile(model)`` in BF16, the baseline;
* ``int8``: every block linear W8A8 INT8 (the Triton INT8 GEMM; per-token activation quantization
  as compiled ops fused in front of it), then ``torch.compile``;
* ``fp8``: every block linear FP8 E4M3 W8A8 (per-token x per-channel scales, ``torch._scaled_mm``);
* ``mixed``: a timestep-dynamic INT4/INT8 plan (below), one compiled graph for every step (the
  step is data: ``backends/torch_runtime.py``); its latency is the mean over the plan's steps of
  the latencies of its segments;
* ``mixed-fp8``: the synthetic mixed plan on FP8 math: its W4A8 layers run INT4 weights with FP8
  E4M3 activations (``w4f8``: the weight expanded to an FP8 scratch, ``torch._scaled_mm``) and its
  W8A8 layers FP8 (same weight memory as ``mixed``);
* ``fp8-attn`` / ``mixed-fp8-attn``: ``fp8`` / ``mixed-fp8`` with the attention itself in FP8 E4M3
  (``backends/attention.py``: diffusers' SDPA calls routed to ``kernels.fp8_attention`` inside
  ``use_fp8_attention``, compiled as the custom op ``adatsq::fp8_attention`` with the Q/K/V
  quantization as compiled ops in front of it, or inside the op with ``--attn-quant kernel``); the row
  records the FP8 attention calls per step (``fp8_attention_calls_per_step``: one per block, else
  the attention fell back to the stock SDPA);
* ``torchao-fp8``: torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` on the same
  linears, then ``torch.compile`` (the peer), with a time limit (its compilation was measured at
  393 s on 4 + 8 blocks).

"Block linears" are every Linear inside the double and single blocks, the adaLN modulation
linears included (batch-1 GEMVs that hold ~27% of Flux-dev's weights); the embedders and the
final layer stay BF16. The mixed plan: the adaLN linears W4A16 (weight-only) at every step, the
MLP linears W4A8 at every step, and the attention projections W8A8 for the first ``--int8-steps``
of ``--steps`` steps and W4A8 after, so they hold both copies; ``--plan plan.json`` maps a search
plan of flux-fmnist onto the model instead (block i <- block i * n_small / n, same layer role;
step k <- step k * S_small / S).

Per variant: preparation time (packing + compilation + the first call of every segment: what a
server pays before its first image), step latency (CUDA events around one call, after warm-up,
median of ``--reps``), weight memory (allocated bytes with the model resident and nothing else),
peak memory during a step, and the output's relative L2 error against the eager BF16 model's on
the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

FLUX_DEV = dict(patch_size=1, in_channels=64, num_attention_heads=24, attention_head_dim=128,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
VARIANTS = ("bf16", "int8", "fp8", "mixed", "mixed-fp8", "fp8-attn", "mixed-fp8-attn", "torchao-fp8")


def split_variant(variant: str) -> tuple[str, bool]:
    """``'mixed-fp8-attn'`` -> ``('mixed-fp8', True)``: the linears' variant and whether the attention
    runs in FP8."""
    if variant.endswith("-attn"):
        return variant[: -len("-attn")], True
    return variant, False


# =========================================================================== the model
def make_model(double: int, single: int, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in BF16 on the GPU: no FP32 copy of 12B weights
    try:
        with torch.device("cuda"):
            model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_DEV)
    finally:
        torch.set_default_dtype(prev)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def make_inputs(image_tokens: int = 4096, text_tokens: int = 512, seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    side = int(round(image_tokens ** 0.5))
    ids = torch.zeros(side, side, 3, device="cuda")
    ids[..., 1] = torch.arange(side, device="cuda")[:, None]
    ids[..., 2] = torch.arange(side, device="cuda")[None, :]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(hidden_states=torch.randn(1, image_tokens, 64, generator=g, **bf),
                encoder_hidden_states=torch.randn(1, text_tokens, 4096, generator=g, **bf),
                pooled_projections=torch.randn(1, 768, generator=g, **bf),
                timestep=torch.tensor([0.6], **bf), guidance=torch.tensor([3.5], **bf),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_tokens, 3, device="cuda"),
                return_dict=False)


def role(name: str) -> str:
    """A block linear's role: adaln, attn or mlp."""
    if ".norm" in name:
        return "adaln"
    if ".attn." in name:
        return "attn"
    if ".ff." in name or ".ff_context." in name or name.endswith(".proj_mlp"):
        return "mlp"
    if name.endswith(".proj_out"):  # single block: the fused attention-out + MLP-down projection
        return "mlp"
    raise ValueError(f"unknown role of {name}")


def block_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (n.startswith("transformer_blocks.") or n.startswith("single_transformer_blocks."))]


def synthetic_plan(names, steps: int, int8_steps: int, fp8: bool = False) -> dict[str, tuple[str, ...]]:
    """adaLN W4A16; MLP W4A8; attention W8A8 for ``int8_steps`` then W4A8. ``fp8``: the same lattice
    points with FP8 E4M3 activations and FP8 math (``w4f8``, ``fp8``) instead of INT8."""
    w4a8, w8a8 = ("w4f8", "fp8") if fp8 else ("w4a8", "w8a8")
    plan = {}
    for n in names:
        r = role(n)
        if r == "adaln":
            plan[n] = ("w4a16",) * steps
        elif r == "mlp":
            plan[n] = (w4a8,) * steps
        else:
            plan[n] = (w8a8,) * int8_steps + (w4a8,) * (steps - int8_steps)
    return plan


PREC_KIND = {"W8A8": "w8a8", "W4A8": "w4a8", "W4A16": "w4a16", "FP16": "fp"}


def mapped_plan(names, steps: int, plan_file: str) -> dict[str, tuple[str, ...]]:
    """A flux-fmnist plan (``adatsq build --target torch-cuda``) mapped onto this model by block
    index and layer role; steps resampled to ``steps``."""
    import re

    p = json.loads(Path(plan_file).read_text())
    layers = [x[: -len(".weight")] if x.endswith(".weight") else x for x in p["layers"]]
    rows = p["assignment"]
    small_steps = len(rows)
    counts = {}
    for x in layers:
        m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", x)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    big = {}
    for n in names:
        m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", n)
        big[m.group(1)] = max(big.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {}
    for n in names:
        m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)", n)
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        j = i * counts[kind] // big[kind]
        src = f"{kind}.{j}.{rest}"
        if src not in layers:
            raise ValueError(f"--plan: {plan_file} has no layer {src} for {n}")
        col = layers.index(src)
        out[n] = tuple(PREC_KIND[rows[k * small_steps // steps][col]] for k in range(steps))
    return out


# =========================================================================== measuring
def cuda_ms(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


#: kernel-name patterns of the step-time breakdown (first match wins; lower-case substrings)
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("quantization", ("quant_rows", "amax", "_unpack", "unpack_int4", "attn_quant")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "_scaled_mm", "sm90_", "cublas", "matmul", "_mm_")),
)


def kernel_category(name: str) -> str:
    """attention / quantization / gemm / other, from a CUDA kernel's name. Inductor's fused
    per-token quantization kernels carry ``amax`` in their names and count as quantization,
    although they also compute the op that produces the activations (a norm, the modulation)."""
    low = name.lower()
    for cat, pats in KERNEL_CATEGORIES:
        if any(p in low for p in pats):
            return cat
    return "other"


def kernel_profile(fn, inputs, clock, step: int, calls: int = 3) -> dict:
    """GPU kernel time of one step by category (ms per call) and the ten costliest kernels, from
    ``torch.profiler`` over ``calls`` calls at ``step``."""
    from torch.profiler import ProfilerActivity, profile

    clock.step = step
    with torch.no_grad():
        fn(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn(**inputs)
            torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us and e.key:
            per[e.key] = per.get(e.key, 0.0) + us / 1000.0 / calls
    cats = {}
    for k, ms in per.items():
        c = kernel_category(k)
        cats[c] = cats.get(c, 0.0) + ms
    top = sorted(per.items(), key=lambda kv: -kv[1])[:10]
    return dict(ms_by_category=cats, kernel_ms_total=sum(per.values()),
                top_kernels=[dict(kernel=k[:120], ms=ms, category=kernel_category(k)) for k, ms in top])


def rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def run_variant(args) -> dict:
    """One variant in this process; returns its row."""
    from adatsq.backends.torch_runtime import lower_linears
    from adatsq.passes.transforms import StepClock

    torch.backends.cuda.matmul.allow_tf32 = True
    row = dict(variant=args.variant, double=args.double, single=args.single)
    variant, fp8_attn = split_variant(args.variant)
    model = make_model(args.double, args.single, args.seed)
    inputs = make_inputs(args.image_tokens, args.text_tokens)
    names = block_linears(model)
    with torch.no_grad():
        ref = model(**inputs)[0].float()
    torch.cuda.synchronize()
    if fp8_attn:  # after the reference: from here on (compilation and timing) the attention runs in FP8
        from adatsq.backends import attention

        attn_stack = contextlib.ExitStack()  # held (a collected generator context would restore the SDPA)
        attn_stack.enter_context(attention.use_fp8_attention(args.attn_quant))
        row["attention"] = f"fp8 (quantize={args.attn_quant})"
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row["bf16_weight_bytes"] = bf16_bytes
    row["block_linear_params"] = sum(dict(model.named_modules())[n].weight.numel() for n in names)
    row["params"] = sum(p.numel() for p in model.parameters())
    clock = StepClock(args.steps)
    segments = {"all": [0]}
    t0 = time.perf_counter()
    if variant in ("int8", "fp8", "mixed", "mixed-fp8"):
        if variant == "mixed-fp8":
            plan = synthetic_plan(names, args.steps, args.int8_steps, fp8=True)
        elif variant == "mixed":
            plan = (mapped_plan(names, args.steps, args.plan) if args.plan
                    else synthetic_plan(names, args.steps, args.int8_steps))
        else:
            plan = {n: (("w8a8" if variant == "int8" else "fp8"),) * args.steps for n in names}
        lower_linears(model, plan, clock, keep_originals=False)
        # segments: steps with the same kernels everywhere
        seg_of = {}
        for k in range(args.steps):
            seg_of.setdefault(tuple(p[k] for p in plan.values()), []).append(k)
        segments = {f"seg{i}": ks for i, ks in enumerate(seg_of.values())}
        row["plan"] = {"kinds": sorted({x for p in plan.values() for x in p}),
                       "segments": {s: ks for s, ks in segments.items()},
                       "source": (args.plan if variant == "mixed" and args.plan else
                                  "synthetic" if variant.startswith("mixed") else variant)}
    elif variant == "torchao-fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        skip = set(n for n in names if role(n) == "adaln") if not args.torchao_adaln else set()
        wanted = set(names) - skip
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, fqn: fqn in wanted)
        row["torchao_quantized_linears"] = len(wanted)
        row["torchao_skipped"] = "adaLN linears (batch-1 rows)" if skip else None
    pack_s = time.perf_counter() - t0
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    row["weight_bytes"] = torch.cuda.memory_allocated() - sum(t.numel() * t.element_size() for t in inputs.values()
                                                              if isinstance(t, torch.Tensor)) - ref.numel() * 4
    row["weight_ratio_to_bf16"] = row["weight_bytes"] / bf16_bytes
    fn = torch.compile(model) if not args.eager else model
    first = {}
    with torch.no_grad():
        for s, ks in segments.items():
            clock.step = ks[0]
            a = time.perf_counter()
            y = fn(**inputs)[0]
            torch.cuda.synchronize()
            first[s] = time.perf_counter() - a
    row["prep_s"] = time.perf_counter() - t0
    row["pack_s"] = pack_s
    row["first_call_s"] = first
    times, errs, peaks = {}, {}, {}
    with torch.no_grad():
        for s, ks in segments.items():
            clock.step = ks[0]
            torch.cuda.reset_peak_memory_stats()
            if fp8_attn:
                calls = attention.CALLS["fp8"]
            y = fn(**inputs)[0]
            torch.cuda.synchronize()
            if fp8_attn:
                row.setdefault("fp8_attention_calls_per_step", {})[s] = attention.CALLS["fp8"] - calls
            peaks[s] = torch.cuda.max_memory_allocated()
            errs[s] = rel_err(y, ref)
            del y
            times[s] = cuda_ms(lambda: fn(**inputs), args.warmup, args.reps)
    if args.profile:
        try:
            row["profile"] = {s: kernel_profile(fn, inputs, clock, ks[0]) for s, ks in segments.items()}
        except Exception as exc:  # noqa: BLE001 - the timing row stands without its breakdown
            row["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["segments_ms"] = {s: statistics.median(t) for s, t in times.items()}
    row["segments_ms_spread"] = {s: [min(t), max(t)] for s, t in times.items()}
    n = sum(len(ks) for ks in segments.values())
    row["ms_per_step"] = sum(row["segments_ms"][s] * len(ks) for s, ks in segments.items()) / n
    row["peak_bytes"] = max(peaks.values())
    row["rel_err_vs_bf16_eager"] = errs
    if fp8_attn:
        attn_stack.close()
    return row


# =========================================================================== driver
def child_cmd(args, variant: str, double: int, single: int) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--double", str(double), "--single", str(single),
           "--steps", str(args.steps), "--int8-steps", str(args.int8_steps), "--warmup", str(args.warmup),
           "--reps", str(args.reps), "--seed", str(args.seed), "--image-tokens", str(args.image_tokens),
           "--text-tokens", str(args.text_tokens)]
    if args.plan:
        cmd += ["--plan", args.plan]
    if args.eager:
        cmd += ["--eager"]
    if args.torchao_adaln:
        cmd += ["--torchao-adaln"]
    if args.profile:
        cmd += ["--profile"]
    if args.attn_quant != "compiled":
        cmd += ["--attn-quant", args.attn_quant]
    return cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=4)
    p.add_argument("--single", type=int, default=8)
    p.add_argument("--variants", default="bf16,int8,fp8,mixed", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--full", default="", help="variants also run at Flux-dev's full depth (19 + 38), comma-separated")
    p.add_argument("--steps", type=int, default=28, help="denoising steps of the mixed plan (Flux-dev: 28)")
    p.add_argument("--int8-steps", type=int, default=8, help="synthetic plan: steps whose attention runs W8A8")
    p.add_argument("--plan", help="map this flux-fmnist plan.json onto the model instead of the synthetic plan")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--timeout", type=float, default=420, help="seconds a variant may take (default %(default)s)")
    p.add_argument("--eager", action="store_true", help="no torch.compile (debugging)")
    p.add_argument("--torchao-adaln", action="store_true", help="torchao also quantizes the adaLN linears")
    p.add_argument("--profile", action="store_true",
                   help="also break each segment's GPU kernel time down by category (gemm, attention, "
                        "quantization, other) with torch.profiler")
    p.add_argument("--attn-quant", choices=("compiled", "kernel"), default="compiled",
                   help="*-attn variants: quantize Q/K/V as compiled ops in front of the FP8 attention op "
                        "(compiled, default) or with the Triton passes inside it (kernel)")
    p.add_argument("--json", help="results JSON (rewritten after every variant)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        try:
            row = run_variant(args)
        except Exception as exc:  # noqa: BLE001 - recorded for the parent
            traceback.print_exc()
            row = dict(variant=args.variant, double=args.double, single=args.single,
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}")
        print("ROW " + json.dumps(row), flush=True)
        return 0
    runs = [(v, args.double, args.single) for v in args.variants.split(",") if v]
    runs += [(v, 19, 38) for v in args.full.split(",") if v]
    for v, _, _ in runs:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    result = dict(format="adatsq.gpu_e2e", version=1, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  gpu=torch.cuda.get_device_name(0), torch=torch.__version__, python=platform.python_version(),
                  command="python3 benchmarks/gpu_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  config=dict(FLUX_DEV, image_tokens=args.image_tokens, text_tokens=args.text_tokens, batch=1,
                              steps=args.steps, int8_steps=args.int8_steps), rows=[])
    try:
        import diffusers

        result["diffusers"] = diffusers.__version__
    except ImportError as exc:
        print(f"diffusers is needed: {exc}", file=sys.stderr)
        return 2
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    for v, d, s in runs:
        env = dict(os.environ)
        cache = tempfile.mkdtemp(prefix=f"e2e-{v}-")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")  # cold caches: honest preparation times
        env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        print(f"== {v} ({d} double + {s} single blocks)", flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(child_cmd(args, v, d, s), env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
            row = json.loads(lines[-1][4:]) if lines else dict(variant=v, double=d, single=s,
                                                                error=f"no result (exit {proc.returncode}): "
                                                                      f"{proc.stderr[-800:]}")
            if row.get("error"):
                print(proc.stderr[-3000:], file=sys.stderr)
        except subprocess.TimeoutExpired:
            row = dict(variant=v, double=d, single=s, error=f"did not finish in {args.timeout:.0f} s (compilation)")
        row["wall_s"] = time.perf_counter() - t
        result["rows"].append(row)
        print(json.dumps({k: row.get(k) for k in ("variant", "ms_per_step", "prep_s", "weight_ratio_to_bf16",
                                                  "peak_bytes", "rel_err_vs_bf16_eager", "error")}), flush=True)
        # speedups against the BF16 row of the same depth
        for r in result["rows"]:
            base = next((b for b in result["rows"] if b["variant"] == "bf16" and b["double"] == r["double"]
                         and b.get("ms_per_step")), None)
            if base and r.get("ms_per_step"):
                r["speedup_vs_bf16_compiled"] = base["ms_per_step"] / r["ms_per_step"]
                r["prep_vs_bf16"] = r["prep_s"] / base["prep_s"]
        if args.json:
            tmp = args.json + ".tmp"
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, args.json)
    print(table(result))
    return 0


def table(result) -> str:
    lines = [f"{result['gpu']}, torch {result['torch']}, {result['date'][:10]}",
             "| blocks | variant | ms/step | speedup | prep s | prep / bf16 | weights GB | weights / bf16 | peak GB | "
             "rel. err |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['double']}+{r['single']} | {r['variant']} | {r['error'][:90]} | | | | | | | |")
            continue
        err = max(r["rel_err_vs_bf16_eager"].values())
        lines.append(f"| {r['double']}+{r['single']} | {r['variant']} | {r['ms_per_step']:.2f} | "
                     f"{r.get('speedup_vs_bf16_compiled', float('nan')):.3f} | {r['prep_s']:.1f} | "
                     f"{r.get('prep_vs_bf16', float('nan')):.2f} | {r['weight_bytes'] / 1e9:.2f} | "
                     f"{r['weight_ratio_to_bf16']:.3f} | {r['peak_bytes'] / 1e9:.2f} | {err:.4f} |")
    prof = [(r, s, p) for r in result["rows"] for s, p in (r.get("profile") or {}).items()]
    if prof:
        lines += ["", "GPU kernel time per step by category (torch.profiler, ms):", "",
                  "| blocks | variant | segment | gemm | attention | quantization | other | kernels total |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r, s, p in prof:
            c = p["ms_by_category"]
            lines.append(f"| {r['double']}+{r['single']} | {r['variant']} | {s} | "
                         + " | ".join(f"{c.get(k, 0.0):.2f}" for k in ("gemm", "attention", "quantization", "other"))
                         + f" | {p['kernel_ms_total']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
