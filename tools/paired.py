"""Paired comparisons of evaluated variants: is method A better than method B on the same seeds?

``adatsq eval --per-sample FILE.safetensors`` keeps, for every variant, the judge's prediction and
features of each sample. Every variant samples the same seeds and labels, so two variants can be
compared sample by sample, which resolves far smaller differences than two independent standard
errors do (near FP both methods get the same samples right):

* accuracy: the mean of ``correct_A - correct_B`` over the samples and its standard error, with
  the discordant counts (A right and B wrong, the reverse) of McNemar's test and its z score;
* FID: ``FID_A - FID_B`` on the full set and a paired bootstrap over the samples (the same
  resampled seeds for both): its standard error and the fraction of resamples in which A's FID is
  lower.

A second table splits each compared variant's FID into its mean and covariance terms, with the
spread of its features (total variance / the reference's) and, where the files hold ``fp``, the
Fréchet distance to the FP model's own samples. Near FP a variant can get a lower FID than FP
itself by moving away from FP's samples in the direction that FP is off from the data (on
flux-fmnist FP's features are off-centre and over-dispersed, and W4A4 quantization narrows them),
so the distance to FP's samples is the fidelity measure there (``metrics.fid_parts``).

    python -m adatsq.tools.paired FILE.safetensors [MORE.safetensors ...] --pair A B [--pair ...]
        [--bootstrap 200] [--json OUT.json] [--md OUT.md]

Variants are named as in the eval JSON (``w3a3-svdquant``, ``plan:out/build`` ...). Files from
several eval runs combine: those of the same seeds add variants, those of disjoint seeds add
samples (``--seed 30000`` and ``--seed 31000`` runs pool into one comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

FORMAT = "adatsq.per-sample"


def save_per_sample(path: str | Path, result: dict[str, Any], judged: dict[str, tuple[np.ndarray, np.ndarray]],
                    labels: np.ndarray, seeds: Sequence[int]) -> None:
    """Write every variant's judge predictions and features per sample (``evaluate(..., judged=)``),
    atomically."""
    from safetensors.numpy import save

    from .io import atomic_path

    names = [v for v in result["variants"] if v in judged]
    tensors = {"labels": np.asarray(labels, np.int64), "seeds": np.asarray(seeds, np.int64)}
    for i, v in enumerate(names):
        pred, feats = judged[v]
        tensors[f"pred/{i}"] = np.asarray(pred, np.int64)
        tensors[f"features/{i}"] = np.asarray(feats, np.float32)
    meta = dict(format=FORMAT, version="1", model=str(result.get("model")), variants=json.dumps(names))
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(tensors, metadata=meta))


def _read(p: Path) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(labels, seeds, {variant: (pred, features)}) of one per-sample file, checked."""
    from safetensors import safe_open

    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        with safe_open(str(p), "numpy") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one clear error
        raise InputError(f"{p}: not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{p}: not an `adatsq eval --per-sample` file (format {meta.get('format')!r})")
    try:
        names = json.loads(meta["variants"])
        labels, seeds = t["labels"], t["seeds"]
        rows = {v: (t[f"pred/{i}"], t[f"features/{i}"].astype(np.float64)) for i, v in enumerate(names)}
    except (KeyError, ValueError) as exc:
        raise InputError(f"{p}: incomplete per-sample file ({exc})") from None
    for v, (pred, feats) in rows.items():
        if pred.shape != labels.shape or feats.shape[0] != labels.shape[0] or not np.isfinite(feats).all():
            raise InputError(f"{p}: variant {v!r}: predictions or features do not match {labels.shape[0]} samples")
    return labels, seeds, rows


def load_per_sample(paths: Sequence[str | Path]) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(labels, {variant: (pred, features)}) of one or more per-sample files. Files of the same
    seeds add variants; files of disjoint seeds add samples (the variants every seed set has)."""
    sets: list[tuple[np.ndarray, np.ndarray, dict]] = []  # one entry per distinct seed set
    for path in paths:
        labels, seeds, rows = _read(Path(path))
        for lab, sd, have in sets:
            if np.array_equal(sd, seeds):
                if not np.array_equal(lab, labels):
                    raise InputError(f"{path}: the same seeds as an earlier file with other labels")
                for v, r in rows.items():
                    have.setdefault(v, r)
                break
            if np.intersect1d(sd, seeds).size:
                raise InputError(f"{path}: its seeds overlap an earlier file's without being the same: "
                                 "the samples can be neither paired nor pooled")
        else:
            sets.append((labels, seeds, dict(rows)))
    common = [v for v in sets[0][2] if all(v in have for _, _, have in sets)]
    if not common:
        raise InputError("the seed sets of these files have no variant in common")
    labels = np.concatenate([lab for lab, _, _ in sets])
    out = {v: (np.concatenate([have[v][0] for _, _, have in sets]), np.concatenate([have[v][1] for _, _, have in sets]))
           for v in common}
    return labels, out


def paired(labels: np.ndarray, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
           ref_mu: np.ndarray, ref_sigma: np.ndarray, bootstrap: int = 200, seed: int = 0) -> dict[str, float]:
    """Paired accuracy and FID differences of A minus B (see the module docstring)."""
    from .metrics import fid

    n = labels.shape[0]
    if n < 2:
        raise InputError(f"a paired comparison needs at least 2 samples, got {n}")
    ca, cb = (a[0] == labels).astype(np.float64), (b[0] == labels).astype(np.float64)
    d = ca - cb
    se = float(d.std(ddof=1) / math.sqrt(n))
    a_only, b_only = int(((ca == 1) & (cb == 0)).sum()), int(((ca == 0) & (cb == 1)).sum())
    z = (a_only - b_only) / math.sqrt(a_only + b_only) if a_only + b_only else 0.0
    fid_a, fid_b = fid(a[1], ref_mu, ref_sigma), fid(b[1], ref_mu, ref_sigma)
    rng = np.random.default_rng(seed)
    deltas = np.empty(bootstrap)
    for r in range(bootstrap):
        idx = rng.integers(0, n, n)
        deltas[r] = fid(a[1][idx], ref_mu, ref_sigma) - fid(b[1][idx], ref_mu, ref_sigma)
    return dict(n=n, acc_a=float(ca.mean()), acc_b=float(cb.mean()), acc_diff=float(d.mean()), acc_diff_se=se,
                a_only=a_only, b_only=b_only, mcnemar_z=float(z), fid_a=float(fid_a), fid_b=float(fid_b),
                fid_diff=float(fid_a - fid_b),
                fid_diff_se=float(deltas.std(ddof=1)) if bootstrap > 1 else float("nan"),
                fid_a_lower=float((deltas < 0).mean()) if bootstrap else float("nan"), bootstrap=bootstrap)


def decomposition(variants: dict[str, tuple[np.ndarray, np.ndarray]], names: Sequence[str],
                  ref_mu: np.ndarray, ref_sigma: np.ndarray) -> dict[str, dict[str, float]]:
    """{variant: FID, its mean and covariance terms, spread, Fréchet distance to fp's samples}
    for ``names`` (and ``fp`` first where the files hold it)."""
    from .metrics import feature_stats, fid_parts, frechet_distance

    fp = feature_stats(variants["fp"][1]) if "fp" in variants else None
    out = {}
    for v in dict.fromkeys((["fp"] if fp is not None else []) + list(names)):
        r = fid_parts(variants[v][1], ref_mu, ref_sigma)
        r["fd_vs_fp"] = frechet_distance(*feature_stats(variants[v][1]), *fp) if fp is not None else float("nan")
        out[v] = r
    return out


def markdown_decomposition(parts: dict[str, dict[str, float]]) -> str:
    out = ["| variant | FID | mean term | covariance term | spread (tr Σ / tr Σ_ref) | Fréchet dist. to FP's samples |",
           "|---|---:|---:|---:|---:|---:|"]
    for v, r in parts.items():
        out.append(f"| {v} | {r['fid']:.3f} | {r['mean']:.3f} | {r['cov']:.3f} | {r['spread']:.4f} | "
                   f"{r['fd_vs_fp']:.3f} |")
    return "\n".join(out) + "\n"


def markdown(rows: Sequence[tuple[str, str, dict[str, float]]]) -> str:
    out = ["| A | B | n | acc. A − B (± SE) | A right, B wrong / reverse | McNemar z | FID A − B (± bootstrap SE) "
           "| A's FID lower in |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for a, b, r in rows:
        out.append(f"| {a} | {b} | {r['n']} | {r['acc_diff']:+.4f} ± {r['acc_diff_se']:.4f} | {r['a_only']} / "
                   f"{r['b_only']} | {r['mcnemar_z']:+.2f} | {r['fid_diff']:+.3f} ± {r['fid_diff_se']:.3f} | "
                   f"{100 * r['fid_a_lower']:.0f}% |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adatsq.tools.paired", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="per-sample files of `adatsq eval --per-sample`")
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"),
                    help="compare variant A with variant B (repeatable)")
    ap.add_argument("--bootstrap", type=int, default=200, help="FID bootstrap resamples (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--md", metavar="FILE")
    args = ap.parse_args(argv)
    try:
        if args.bootstrap < 0:
            raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        from .judge import Judge
        from .io import atomic_write_text

        labels, variants = load_per_sample(args.files)
        for a, b in args.pair:
            for v in (a, b):
                if v not in variants:
                    raise InputError(f"no variant {v!r} in the files ({', '.join(variants)})")
        ref_mu, ref_sigma = Judge.load().reference_stats()
        rows = [(a, b, paired(labels, variants[a], variants[b], ref_mu, ref_sigma, args.bootstrap, args.seed))
                for a, b in args.pair]
        parts = decomposition(variants, [v for pair in args.pair for v in pair], ref_mu, ref_sigma)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md = markdown(rows) + "\n" + markdown_decomposition(parts)
    print(md, end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(dict(pairs=[dict(a=a, b=b, **r) for a, b, r in rows],
                                                     fid_parts=parts), indent=1) + "\n")
    if args.md:
        atomic_write_text(args.md, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
