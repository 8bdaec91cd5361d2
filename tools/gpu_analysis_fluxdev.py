"""Measure the analysis passes on a Flux-dev-width transformer on one GPU, and extrapolate.

Runs the real passes (:mod:`adatsq.passes.analysis`) on a random-init ``FluxTransformer2DModel``
with Flux-dev's width (24 heads x 128, joint 4096, pooled 768, 64 latent channels, guidance
embedding) and a slice of its depth (default 4 double + 8 single blocks, ~1/5 of the model),
in BF16, at 1024x1024 (4096 image + 512 text tokens), one calibration sample, a few steps:

* trajectory capture (FP sampling),
* temporal Fisher (forward + backward to every layer output + per-sample weight-gradient norms +
  the per-layer Fisher proxy at ``--precisions``),
* statistics and Fisher-weighted Hessians (weighted mode, float64 sums, chunked to
  ``--max-hessian-gib``),

and one step of the sensitivity measurement as its forward count (group x precision forwards).
It writes per-pass seconds per sample-step and peak GPU memory, the Hessian memory of the full
Flux-dev depth (from the layer shapes of a meta-device model, no weights), and the extrapolation
to the full model, 50 steps and N calibration samples, as JSON.

    python tools/gpu_analysis_fluxdev.py --out benchmarks/results/analysis_fluxdev_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def hessian_entries_full_depth() -> dict:
    import diffusers

    with torch.device("meta"):
        m = diffusers.FluxTransformer2DModel(**FLUX_DEV)
    ks = [mod.in_features for _, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    params = sum(p.numel() for p in m.parameters())
    return dict(linears=len(ks), sum_k2=sum(k * k for k in ks), max_k=max(ks), params=params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="latent tokens per side (64 -> 4096 = 1024x1024)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--precisions", default="W4A4,W8A8")
    ap.add_argument("--max-hessian-gib", type=float, default=24)
    ap.add_argument("--hessian-tokens", type=int, help="subsample tokens per call and layer for the Hessians")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test of the script)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import diffusers

    from adatsq.frontend.architectures import Resolution
    from adatsq.frontend.denoisers import FluxDenoiser, random_prompt_embeddings
    from adatsq.frontend.export import export_model
    from adatsq.frontend.schedule import default_schedule
    from adatsq.passes.analysis import (ActivationStatistics, AnalysisContext, AnalysisOptions, CaptureTrajectory,
                                        TemporalFisher, hessian_chunks, layer_groups, memory_plan)
    from adatsq.passes.calibration import CalibrationSet

    dev = torch.device(args.device)
    if dev.type == "cuda":
        # torch 2.11+cu130 on the H100: the cuDNN SDPA kernels fail in bf16 on Flux shapes (seen in
        # training too); the flash/efficient kernels are used instead
        torch.backends.cuda.enable_cudnn_sdp(False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type != "cuda":
        torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
        torch.cuda.get_device_name = lambda: "cpu"
    cfg = dict(FLUX_DEV, num_layers=args.double, num_single_layers=args.single)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = diffusers.FluxTransformer2DModel(**cfg).to(torch.bfloat16).eval()
    init_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    den = FluxDenoiser(model, args.tokens, args.tokens, guidance=3.5, text_len=args.text_len)
    conds = random_prompt_embeddings(model, 1, args.text_len)
    schedule = default_schedule("FluxTransformer2DModel", args.steps, 1.0)
    calib = CalibrationSet(den, conds, (10_000,), schedule, batch=1)
    t0 = time.perf_counter()
    graph = export_model(model, Resolution(height=2 * args.tokens, width=2 * args.tokens, text_len=args.text_len,
                                           batch=1), dynamic=False)
    export_s = time.perf_counter() - t0
    precisions = tuple(args.precisions.split(","))
    # Hessians of the first double and first single block only (the full slice's float64 sums would
    # not fit): their GEMM cost is extrapolated by sum(K^2)
    opts = AnalysisOptions(hessian="weighted", precisions=precisions, hessian_tokens=args.hessian_tokens,
                           max_hessian_bytes=int(args.max_hessian_gib * 2 ** 30),
                           hessian_layers=r"^(transformer_blocks\.0|single_transformer_blocks\.0)\.")
    ctx = AnalysisContext(calib, opts)
    table = ctx.layers(graph)
    plan = memory_plan(table, calib, opts)

    # eager forward time, batch 1
    x = torch.randn(1, *den.latent_shape())
    inp = calib.model_inputs(x, 0, [0])
    with torch.inference_mode():
        for _ in range(2):
            den(*inp)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            den(*inp)
        sync()
    fwd_s = (time.perf_counter() - t0) / 5

    passes = {}
    for cls in (CaptureTrajectory, TemporalFisher, ActivationStatistics):
        torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        cls(ctx)(graph)
        sync()
        s = time.perf_counter() - t0
        passes[cls.__name__] = dict(seconds=round(s, 3), per_sample_step=round(s / args.steps, 3),
                                    peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
        print(cls.__name__, passes[cls.__name__], flush=True)
    # the statistics pass once more without Hessians: what the replay and statistics cost alone
    ctx2 = AnalysisContext(calib, dataclasses.replace(opts, hessian="none"))
    ctx2.results, ctx2.table, ctx2.modules = dict(ctx.results), ctx.table, ctx.modules
    sync()
    t0 = time.perf_counter()
    ActivationStatistics(ctx2)(graph)
    sync()
    stats_only = time.perf_counter() - t0
    f = ctx.results["fisher"]["seconds"].tolist()
    hk2 = sum(table[p].in_features ** 2 for p in ctx.results["hessians"])
    slice_k2 = sum(i.in_features ** 2 for i in table)
    groups = len(layer_groups(table, "block"))

    full = hessian_entries_full_depth()
    frac = params / full["params"]
    steps50, n = 50, 64
    per_ss = {k: v["per_sample_step"] / frac for k, v in passes.items()}
    share = hk2 / slice_k2
    hess_extra = max(passes["ActivationStatistics"]["seconds"] - stats_only, 0.0)
    # statistics at full depth: replay + statistics scale with parameters, Hessian GEMMs with sum(K^2)
    per_ss["ActivationStatistics"] = (stats_only / frac + hess_extra / share * full["sum_k2"] / slice_k2) / args.steps
    sens_per_step = groups / frac * len(opts.precisions) * fwd_s / frac  # forwards per step x forward time
    est = dict(
        assumption=f"cost scales with parameters (slice = {frac:.3f} of Flux-dev); {steps50} steps, {n} samples, "
                   f"no CFG (Flux-dev is guidance-distilled), sensitivity by block on 8 samples",
        trajectory_h=per_ss["CaptureTrajectory"] * steps50 * n / 3600,
        fisher_h=per_ss["TemporalFisher"] * steps50 * n / 3600,
        statistics_h=per_ss["ActivationStatistics"] * steps50 * n / 3600,
        sensitivity_h=sens_per_step * steps50 * 8 / 3600,
        hessian_gib_full_depth_per_slot_f64=full["sum_k2"] * 8 / 2 ** 30,
        hessian_share_measured=share,
        statistics_without_hessians_s=round(stats_only, 3), hessian_gemm_s=round(hess_extra, 3),
    )
    out = dict(
        date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        hessian_tokens=args.hessian_tokens, slice=dict(double=args.double, single=args.single, params=params, linears=len(table)),
        full_depth=full, tokens=args.tokens ** 2 + args.text_len, steps=args.steps, precisions=list(precisions),
        init_s=round(init_s, 1), export_s=round(export_s, 1), forward_s=round(fwd_s, 4),
        fisher_breakdown_s=dict(forward_backward=round(f[0], 2), weight_grad_norms=round(f[1], 2),
                                fisher_proxy=round(f[2], 2)),
        memory_plan_slice={k: v for k, v in plan.items()}, hessian_chunks_slice=len(hessian_chunks(table, opts, args.steps)),
        passes=passes, estimate_full_model_one_gpu=est)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
