"""GPTQ on flux-fmnist: output error of RTN, GPTQ (uniform Hessian) and GPTQ (Fisher-weighted
Hessian), per layer, under both Hessians.

    .venv/bin/python tools/gptq_report.py --out benchmarks/results/gptq_flux_fmnist.json

Runs the analysis passes (trajectory, Fisher, statistics) on the default calibration set first
(cached under the default cache root). Errors are ``tr((W - Q) H (W - Q)^T)`` with ``H`` the mean
second moment (uniform) or the Fisher-weighted one, summed over the 48 linears.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux-fmnist")
    ap.add_argument("--bits", default="3,4,8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from adatsq.frontend.reference import load_reference
    from adatsq.passes.gptq import gptq, weighted_error
    from adatsq.passes.quant import fake_quant_weight
    from adatsq.tools.baselines import reference_hessians
    from adatsq.tools.io import atomic_write_text
    from adatsq.tools.sysinfo import cpu_name

    t0 = time.perf_counter()
    hess = reference_hessians(args.model, log=print)
    t_an = time.perf_counter() - t0
    ref = load_reference(args.model)
    mods = dict(ref.denoiser.transformer.named_modules())
    rows = {}
    for bits in [int(b) for b in args.bits.split(",")]:
        tot = {k: 0.0 for k in ("rtn_u", "rtn_f", "gptq_u_u", "gptq_u_f", "gptq_f_u", "gptq_f_f")}
        wins_f = wins_u = 0
        t1 = time.perf_counter()
        for p, h in hess.items():
            w = mods[p[:-7]].weight.data.float()
            hu, hf = h.mean(0), h.mean(1)
            r = fake_quant_weight(w, bits)
            qu = gptq(w, hu, bits).dequantize()
            qf = gptq(w, hf, bits).dequantize()
            e = dict(rtn_u=weighted_error(w, r, hu), rtn_f=weighted_error(w, r, hf),
                     gptq_u_u=weighted_error(w, qu, hu), gptq_u_f=weighted_error(w, qu, hf),
                     gptq_f_u=weighted_error(w, qf, hu), gptq_f_f=weighted_error(w, qf, hf))
            for k in tot:
                tot[k] += e[k]
            wins_f += e["gptq_f_f"] < e["gptq_u_f"]
            wins_u += e["gptq_u_u"] < e["gptq_f_u"]
        rows[f"W{bits}"] = dict(totals={k: float(f"{v:.6g}") for k, v in tot.items()}, layers=len(hess),
                                fisher_wins_under_fisher=wins_f, uniform_wins_under_uniform=wins_u,
                                gptq_seconds=round(time.perf_counter() - t1, 1))
        print(f"W{bits}: {rows[f'W{bits}']}", flush=True)
    out = dict(model=args.model, cpu=cpu_name(), analysis_seconds=round(t_an, 1), results=rows,
               note="totals: sum over layers of tr((W-Q) H (W-Q)^T); suffix _u/_f = measured under the "
                    "uniform / Fisher-weighted Hessian; gptq_u = GPTQ fitted with the uniform Hessian, "
                    "gptq_f = with the Fisher-weighted one")
    atomic_write_text(args.out, json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
