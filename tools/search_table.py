"""Issue 6's results table and Pareto plot from one evaluation JSON (``adatsq eval --json``) that
holds the uniform baselines and the plans of several ``adatsq build`` directories.

    python -m adatsq.tools.search_table EVAL.json --out docs/search_table
        -> docs/search_table.md (adatsq vs every uniform baseline at W4A4 and W3A3, ablations beside)
           docs/search_table.png (quality vs average bits: adatsq plans and the uniform methods)

A build's role comes from its ``report.json`` (budget, policy, beam, weights, base), read from the
plan's directory; the eval JSON alone is enough when the directories are gone (then the variant
name is shown as it is).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .quality_table import LABELS

#: the default build options (tools/build.py: BuildOptions); a build that differs is an ablation
DEFAULTS = dict(policy="dynamic", beam=4, weights="gptq-fisher", base="lowrank", rank=32, search_samples=10, pace=0.1,
                search_sensitivity="measured", anchor=True, search_score="heldout", fisher_mix=1.0)
#: what builds made before an option existed did (their reports do not name it)
LEGACY = dict(anchor=False, search_score="calibration", fisher_mix=1.0)


def build_label(report: dict[str, Any] | None, variant: str) -> tuple[str, bool]:
    """(label, is_default_adatsq) of a plan variant."""
    if report is None:
        return variant, False
    o = report.get("options", {})
    o = {**LEGACY, **o}
    diffs = [f"{k}={o.get(k)}" for k in DEFAULTS if k in o and o.get(k) != DEFAULTS[k]]
    if not diffs:
        return "AdaTSQ (ours)", True
    names = {"policy=per-step": "per-step only", "policy=per-layer": "per-layer only (static)",
             "policy=uniform": "uniform (searched)", "beam=1": "greedy (K = 1)", "weights=gptq": "uniform-H GPTQ",
             "weights=rtn": "RTN weights", "base=plain": "no low-rank base",
             "pace=None": "no budget pacing", "search_sensitivity=analysis": "RTN sensitivity candidates",
             "anchor=False": "no uniform anchor", "search_score=calibration": "scored on calibration samples"}
    names.update({f"fisher_mix={o['fisher_mix']}": f"Fisher mix {o['fisher_mix']:g}"})
    return "ablation: " + ", ".join(names.get(d, d) for d in diffs), False


#: where build reports are looked for when a plan's own directory is gone (see --builds)
BUILDS: list[Path] = []


def _report(variant: str) -> dict[str, Any] | None:
    d = Path(variant.split(":", 1)[1])
    for f in [d / "report.json"] + [b / d.name / "report.json" for b in BUILDS]:
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for v, r in result["variants"].items():
        if "error" in r:
            continue
        row = dict(variant=v, w=r["w_bits"], a=r["a_bits"], acc=r["judge_accuracy"], fid=r["fid"],
                   psnr=r.get("psnr_vs_fp"), ssim=r.get("ssim_vs_fp"))
        if v.split(":", 1)[0] in ("plan", "deployed", "ort"):
            rep = _report(v)
            row["label"], row["adatsq"] = build_label(rep, v)
            row["search_error"] = rep["search"]["final_error"] if rep else None
            row["memory"] = (rep.get("memory") or {}).get("ratio_to_fp16") if rep else None
            row["budget"] = (f"W{rep['budget']['w_bits']:g}A{rep['budget']['a_bits']:g}" if rep else None)
            row["kind"] = "plan"
        elif v == "fp":
            row.update(label="FP", kind="fp", budget=None, adatsq=False)
        else:
            bits, method = v.split("-", 1)
            row.update(label=LABELS.get(method, method), kind="uniform", budget=bits.upper(), adatsq=False)
        out.append(row)
    return out


def _fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def markdown(result: dict[str, Any], budgets: Sequence[str] = ("W4A4", "W3A3")) -> str:
    rs = rows(result)
    fp = next(r for r in rs if r["kind"] == "fp")
    lines = [f"{result['samples']} samples per variant (balanced over 10 classes, seeds 0..{result['samples'] - 1}), "
             f"{result['schedule']['num_steps']} steps, guidance {result['schedule']['guidance']}; sampled on "
             f"{result['environment'].get('device', 'cpu')}. FP: judge accuracy {fp['acc']:.3f}, FID {fp['fid']:.2f}. "
             "Bits are averages over layers and steps (weights by parameters, activations by MACs); the "
             "16-bit low-rank branches of the SVDQuant-like baseline and of AdaTSQ's base are not counted, "
             "as the papers count them.", ""]
    for b in budgets:
        sel = [r for r in rs if r["budget"] == b]
        if not sel:
            continue
        sel.sort(key=lambda r: (r["kind"] != "plan", not r["adatsq"], r["label"]))
        lines += [f"### average {b}", "", "| method | W avg | A avg | judge acc. | FID | PSNR vs FP (dB) | SSIM vs FP "
                  "| search error | weights / FP16 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sel:
            name = f"**{r['label']}**" if r["adatsq"] else r["label"]
            se = "—" if r.get("search_error") is None else f"{r['search_error']:.2e}"
            lines.append(f"| {name} | {r['w']:.2f} | {r['a']:.2f} | {r['acc']:.3f} | {r['fid']:.2f} | "
                         f"{_fmt(r['psnr'])} | {_fmt(r['ssim'], 4)} | {se} | {_fmt(r.get('memory'))} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_png

    rs = rows(result)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "psnr", "PSNR vs FP (dB), higher is better"),
                          (axes[1], "fid", "FID (judge features), lower is better")):
        uni: dict[str, list] = {}
        for r in rs:
            if r["kind"] == "uniform" and r[key] is not None:
                uni.setdefault(r["label"], []).append(((r["w"] + r["a"]) / 2, r[key]))
        for label, pts in sorted(uni.items()):
            pts.sort()
            ax.plot(*zip(*pts), "o-", ms=4, lw=1, alpha=0.6 if "SVDQuant" not in label else 1.0, label=label)
        ours = sorted(((r["w"] + r["a"]) / 2, r[key]) for r in rs if r["adatsq"] and r[key] is not None)
        if ours:
            ax.plot(*zip(*ours), "k*-", ms=11, lw=2, label="AdaTSQ (ours)")
        abl = [((r["w"] + r["a"]) / 2, r[key]) for r in rs if r["kind"] == "plan" and not r["adatsq"]
               and r[key] is not None]
        if abl:
            ax.plot(*zip(*abl), "x", color="0.45", ms=6, label="AdaTSQ ablations (any budget)")
        fp = next(r for r in rs if r["kind"] == "fp")
        if key == "fid":
            ax.axhline(fp["fid"], color="0.5", ls="--", lw=1, label="FP")
            ax.set_yscale("log")
        ax.set_xlabel("average bits ((W + A) / 2)")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: quality vs average bits, {result['samples']} samples")
    fig.tight_layout()
    save_png(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import InputError
    from .io import atomic_write_text, read_json

    ap = argparse.ArgumentParser(prog="python -m adatsq.tools.search_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_json", nargs="+", help="one or more eval JSONs of the same model, samples and seed "
                    "(their variants are merged; the first one's FP row is kept)")
    ap.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.md and PREFIX.png")
    ap.add_argument("--builds", action="append", default=[], metavar="DIR",
                    help="also look for a plan's report.json in DIR/<build name>/ (copies of the build directories)")
    ap.add_argument("--exclude", action="append", default=[], metavar="VARIANT",
                    help="leave out a variant (e.g. plan:out/builds/old, superseded by a rebuild)")
    args = ap.parse_args(argv)
    BUILDS[:] = [Path(b) for b in args.builds]
    try:
        result = None
        for path in args.eval_json:
            r = read_json(path, InputError)
            if not isinstance(r, dict) or r.get("format") != "adatsq.eval":
                raise InputError(f"{path}: not an adatsq eval JSON")
            if result is None:
                result = r
                continue
            for key in ("model_fingerprint", "samples", "seed", "schedule"):
                if r.get(key) != result.get(key):
                    raise InputError(f"{path}: {key} differs from {args.eval_json[0]} ({r.get(key)} vs {result.get(key)})")
            for v, row in r["variants"].items():
                result["variants"].setdefault(v, row)
        for v in args.exclude:
            if result["variants"].pop(v, None) is None:
                raise InputError(f"--exclude {v}: no such variant in the eval JSONs")
        prefix = Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        md = markdown(result)
        atomic_write_text(prefix.with_suffix(".md"), md + "\n")
        plot(result, prefix.with_suffix(".png"))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
