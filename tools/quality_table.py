"""The quality table of issue 5: every uniform baseline and peer on ``flux-fmnist``.

    python -m adatsq.tools.quality_table -n 128 --out out/quality_table

runs, through the evaluation harness (:mod:`adatsq.tools.evaluate`), the full-precision model and

* each of our re-implemented baselines (``rtn``, ``smoothquant``, ``quarot``, ``gptq``, ``qdit``,
  ``viditq``, ``svdquant``; see :mod:`adatsq.tools.baselines`) at W8A8, W4A8, W4A4 and W3A3;
* each peer (:mod:`adatsq.tools.peers`: nvidia-modelopt, torchao and compressed-tensors configurations) at its own
  precision; a peer that cannot run (package missing, or an error inside it) is recorded with its
  exact error instead of stopping the table;

and writes ``OUT.json`` (the harness's result: every metric of every variant), ``OUT.md`` (a
table per metric, methods x bit-widths, and the peers) and ``OUT.png`` (PSNR and FID vs
bit-width per method). Everything is deterministic for a seed; timings go to the Markdown only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

BASELINES = ("rtn", "smoothquant", "quarot", "gptq", "qdit", "viditq", "svdquant")
LABELS = {
    "rtn": "RTN", "smoothquant": "SmoothQuant (ours)", "quarot": "QuaRot (ours)", "gptq": "GPTQ",
    "qdit": "Q-DiT-like (ours)", "viditq": "ViDiT-Q-like (ours)", "svdquant": "SVDQuant-like (ours)",
    "gptq-fisher": "GPTQ, Fisher-weighted H (AdaTSQ)", "gptq-fisher-latent": "GPTQ, latent-Fisher H (AdaTSQ)",
}
BITS = ("W8A8", "W4A8", "W4A4", "W3A3")
METRICS = (("judge_accuracy", "judge accuracy", ".3f"), ("fid", "FID (judge features)", ".2f"),
           ("psnr_vs_fp", "PSNR vs FP (dB)", ".2f"), ("ssim_vs_fp", "SSIM vs FP", ".4f"))


def variants(methods: Sequence[str], bits: Sequence[str], peers: Sequence[str]) -> list[str]:
    return [f"{b.lower()}-{m}" for m in methods for b in bits] + list(peers)


def markdown(result: dict[str, Any], methods: Sequence[str], bits: Sequence[str], peers: Sequence[str],
             seconds: dict[str, float], wall: float) -> str:
    v = result["variants"]
    fp = v["fp"]
    s = result["schedule"]
    out = [f"# Quality of uniform baselines and peers on {result['model']}", "",
           f"{result['samples']} samples (balanced over {len(result['classes'])} classes, seeds "
           f"{result['seed']}..{result['seed'] + result['samples'] - 1}), {s['num_steps']} steps, guidance "
           f"{s['guidance']}. FP: judge accuracy {fp['judge_accuracy']:.3f}, FID {fp['fid']:.2f}. FID is biased "
           f"upwards at small sample counts: compare FIDs at equal n only. Weights symmetric INT per output "
           f"channel (groups where a method says so), activations symmetric INT per token, dynamic.", ""]
    for key, title, fmt in METRICS:
        out += [f"## {title}", "", "| method | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
        for m in methods:
            cells = []
            for b in bits:
                r = v.get(f"{b.lower()}-{m}", {})
                cells.append("—" if r.get(key) is None else format(r[key], fmt))
            out.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        out.append("")
    if peers:
        out += ["## Peers (third-party quantizers, same harness)", "",
                "| peer | W bits | A bits | judge acc. | FID | PSNR vs FP | SSIM vs FP |", "|---|---:|---:|---:|---:|---:|---:|"]
        for p in peers:
            r = v[p]
            if "error" in r:
                out.append(f"| {p} | {r['w_bits']:.0f} | {r['a_bits']:.0f} | did not run: "
                           f"{' '.join(r['error'].split())[:300]} | | | |")
            else:
                out.append(f"| {p} | {r['w_bits']:.0f} | {r['a_bits']:.0f} | {r['judge_accuracy']:.3f} | "
                           f"{r['fid']:.2f} | {r['psnr_vs_fp']:.2f} | {r['ssim_vs_fp']:.4f} |")
        out.append("")
    env = result["environment"]
    out += ["## Time", "", f"Whole table: {wall / 60:.1f} min on {env['cpu']} ({env['threads']} threads), "
            f"torch {env['torch']}. Per variant (preparation + sampling): "
            + ", ".join(f"{k} {t:.0f} s" for k, t in seconds.items()) + ".", ""]
    return "\n".join(out)


def plot(result: dict[str, Any], methods: Sequence[str], bits: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_png

    v = result["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title, _) in zip(axes, (METRICS[2], METRICS[1], METRICS[0])):
        for m in methods:
            ys = [v.get(f"{b.lower()}-{m}", {}).get(key) for b in bits]
            ax.plot(range(len(bits)), [float("nan") if y is None else y for y in ys], marker="o", label=LABELS.get(m, m))
        if key != "psnr_vs_fp":
            ax.axhline(v["fp"][key], color="k", ls="--", lw=1, label="FP")
        ax.set_xticks(range(len(bits)), bits)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: uniform baselines, {result['samples']} samples")
    fig.tight_layout()
    save_png(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import AdatsqError
    from .cli import console, run_eval
    from .peers import cpu_peers
    from .evaluate import EvalConfig, save_json
    from .io import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m adatsq.tools.quality_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="flux-fmnist")
    ap.add_argument("-n", type=int, default=128, help="samples per variant (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", action="append", help=f"baselines (default: {', '.join(BASELINES)})")
    ap.add_argument("--bits", action="append", help=f"bit-widths (default: {', '.join(BITS)})")
    ap.add_argument("--peer", action="append",
                    help=f"peers (default: the CPU ones, {', '.join(cpu_peers())}); 'none' for none")
    ap.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.json, PREFIX.md, PREFIX.png")
    args = ap.parse_args(argv)
    from .sysinfo import keep_freed_memory

    keep_freed_memory()
    methods = tuple(args.method or BASELINES)
    bits = tuple(b.upper() for b in (args.bits or BITS))
    peers = () if args.peer == ["none"] else tuple(args.peer or cpu_peers())
    cfg = EvalConfig(model=args.model, variants=tuple(variants(methods, bits, peers)), n=args.n, seed=args.seed,
                     keep_going=True)
    try:
        cfg.validate()
        t0 = time.perf_counter()
        result, _, seconds = run_eval(cfg)
        wall = time.perf_counter() - t0
    except AdatsqError as exc:  # the CLI's error style: one line, exit code 2
        console.print(f"[red]error:[/] {exc}")
        return 2
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(result, methods, bits, peers, seconds, wall)
    save_json(result, prefix.with_suffix(".json"))
    atomic_write_text(prefix.with_suffix(".md"), md)
    plot(result, methods, bits, prefix.with_suffix(".png"))
    console.print(md)
    console.print(f"wrote {prefix.with_suffix('.json')}, {prefix.with_suffix('.md')}, {prefix.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
