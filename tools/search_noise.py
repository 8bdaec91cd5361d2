"""How noisy is the search's objective? The end-to-end latent error of one fixed policy (uniform at
a lattice point) on the search's held-out samples, re-measured under perturbations that should
not matter: the initial latents moved by ``--eps`` (relative 1e-6 by default, far below any
quantization step), and the same policy evaluated in batches of other shapes (how the beam
search batches candidates). If the spread is comparable to the differences between candidate
policies, the search ranks them by noise.

    python -m adatsq.tools.search_noise --budget W3A3 --point W3A3 --trials 4

Prints one line per trial (the error and the per-sample errors) and a JSON summary; CPU, about a
minute per trial on 2 cores for flux-fmnist (after the analysis cache is warm).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="flux-fmnist")
    ap.add_argument("--budget", default="W3A3", help="the budget whose base (smoothing) the copies are made for")
    ap.add_argument("--point", default="W3A3", help="the lattice point of the uniform policy measured")
    ap.add_argument("--samples", type=int, default=10, help="held-out search samples (build default 10)")
    ap.add_argument("--trials", type=int, default=4, help="perturbed repeats (trial 0 is unperturbed)")
    ap.add_argument("--eps", type=float, default=1e-6, help="std of the Gaussian added to the initial latents")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--cache", default=None, help="analysis cache (as adatsq build --cache)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from ..frontend.export import export_model
    from ..frontend.reference import load_reference
    from ..passes.analysis import AnalysisOptions, analyze, parse_point
    from ..passes.cache import default_cache_root
    from ..passes.calibration import reference_calibration
    from ..passes.plan import Precision
    from ..passes.search import (SwitchableLayers, heldout_set, layer_transform_factory, model_step_fn,
                                 parse_budget, sensitivity_table)
    from ..passes.transforms import transformed_layers
    from ..passes.weights import prepare_layers
    from .build import linear_layers
    from .sysinfo import cpu_name

    torch.manual_seed(0)
    budget = parse_budget(args.budget)
    point = Precision(args.point.upper(), *parse_point(args.point.upper()))
    ref = load_reference(args.model)
    graph = export_model(args.model)
    calib = reference_calibration(ref)
    res = analyze(graph, calib, AnalysisOptions(hessian="weighted", precisions=(point.name,), e2e_steps=0,
                                                groups="block", sensitivity_samples=1),
                  cache_dir=Path(args.cache) if args.cache else default_cache_root())
    lat = res.results["trajectory"]
    bits = tuple(min(8, max(2, round(b))) for b in (budget.w_bits, budget.a_bits))
    prep = prepare_layers(calib, lat, linear_layers(graph, ref.denoiser.transformer), *bits, rank=args.rank)
    make = layer_transform_factory(ref.denoiser.transformer, graph, "gptq-fisher", prep=prep, group_size=64)
    groups, _ = sensitivity_table(graph, (point,))
    fp16 = Precision("FP16", 16, 16)
    switch = SwitchableLayers({p: {point.name: make(p, point), fp16.name: make(p, fp16)}
                               for ls in groups.values() for p in ls})
    held, fp, samples = heldout_set(calib, args.samples)
    fn = model_step_fn(held, switch, groups, (point, fp16), fp, samples)
    G = len(groups)
    uniform, other = (0,) * G, (1,) * G
    runs = []

    def trajectory(x0, batched: bool):
        x = x0
        for k in range(held.num_steps):
            # batched: beside a candidate of another precision, so every layer runs on chunks of
            # one sample set (cond and uncond apart), as the beam search evaluates most candidates
            x, err = fn(x, k, [uniform, other] if batched else [uniform])[0]
        per = (x - fp[held.num_steps, samples]).square().flatten(1).mean(1)
        return err, per.tolist()

    with transformed_layers(ref.denoiser.transformer, switch.transforms()):
        for trial in range(args.trials + 1):
            t = time.perf_counter()
            x0 = fp[0, samples].clone()
            if 0 < trial < args.trials:
                x0 = x0 + args.eps * torch.randn(x0.shape, generator=torch.Generator().manual_seed(trial))
            batched = trial == args.trials  # the last run: unperturbed, evaluated in chunks
            err, per = trajectory(x0, batched)
            label = "chunked" if batched else ("unperturbed" if trial == 0 else f"eps {args.eps:g} seed {trial}")
            runs.append(dict(run=label, error=err, per_sample=per))
            print(f"{label:>22}: error {err:.4e}  per sample " + " ".join(f"{v:.1e}" for v in per)
                  + f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    errs = [r["error"] for r in runs]
    summary = dict(model=args.model, budget=args.budget, point=point.name, samples=args.samples, eps=args.eps,
                   cpu=cpu_name(), runs=runs, min=min(errs), max=max(errs), mean=statistics.mean(errs),
                   rel_spread=(max(errs) - min(errs)) / statistics.mean(errs))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.json:
        from .io import atomic_write_text

        atomic_write_text(args.json, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
