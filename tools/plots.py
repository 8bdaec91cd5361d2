"""PNG plots of analysis results (matplotlib, Agg backend, written atomically).

* :func:`fisher_png`: the per-step Fisher total ``I[t]`` as a bar strip (the paper's ``I_t`` bar)
  over a heatmap of ``log10 I[t][l]`` (layers x steps), with the step weights ``alpha`` beside it;
* :func:`sensitivity_png`: one heatmap per precision of the one-step error of every layer group at
  every step (log scale), a strip of its per-step total, and the proxy-vs-end-to-end scatter that
  the rank agreement is measured on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG atomically (110 dpi) and close it."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def _short(name: str) -> str:
    return (name.replace(".weight", "").replace("single_transformer_blocks.", "S").replace("transformer_blocks.", "D")
            .replace("time_text_embed.", "").replace(".attn.", ".").replace("_embedder", "_emb"))


def _log10(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        out = np.log10(np.where(a > 0, a, np.nan))
    return out


def fisher_png(summary: Mapping[str, Any], path: str | Path, title: str = "") -> None:
    plt = _plt()
    f = summary["fisher"]
    per_layer = np.asarray(f["per_layer_weight" if f["source"] == "weight" else "per_layer_output"],
                           dtype=float)  # [S, L]
    alpha = np.asarray(f["alpha"], dtype=float)
    total = np.asarray(f["total_weight" if f["source"] == "weight" else "total_output"], dtype=float)
    layers = [_short(p) for p in summary["layers"]]
    steps = per_layer.shape[0]
    h = max(5.0, 0.16 * len(layers) + 2.5)
    fig = plt.figure(figsize=(13, h))
    gs = fig.add_gridspec(2, 2, height_ratios=[1.2, max(3.0, 0.16 * len(layers))], width_ratios=[1, 1],
                          hspace=0.08, wspace=0.35)
    ax_bar = fig.add_subplot(gs[0, 0])
    ax_bar.bar(np.arange(steps), total / total.sum(), color="#c0392b", label="I[t] (velocity loss)")
    if f.get("total_latent"):
        lat = np.asarray(f["total_latent"], dtype=float)
        ax_bar.plot(np.arange(steps), lat / lat.sum(), color="#2c3e50", marker=".", lw=1,
                    label="I[t] * dsigma_t^2 (latent)")
        ax_bar.legend(fontsize=7, loc="upper center")
    ax_bar.set_yscale("log")
    ax_bar.set_xlim(-0.5, steps - 0.5)
    ax_bar.set_xticks([])
    ax_bar.set_ylabel("share", fontsize=8)
    ratio = f.get("max_min_ratio")
    ax_bar.set_title(f"{title}per-step Fisher I[t] (max/min = {ratio:.3g})" if ratio else
                     f"{title}per-step Fisher I[t]", fontsize=10)
    ax = fig.add_subplot(gs[1, 0])
    im = ax.imshow(_log10(per_layer.T), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xlabel("denoising step (0 = pure noise)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label=f"log10 I[t][l] ({f['source']} Fisher)")
    ax2 = fig.add_subplot(gs[1, 1])
    im2 = ax2.imshow(alpha.T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax2.set_yticks([])
    ax2.set_xlabel("denoising step")
    ax2.set_title(f"alpha[t][l] (mean 1 per layer, temperature {f['temperature']:g})", fontsize=9)
    fig.colorbar(im2, ax=ax2, fraction=0.04, pad=0.01)
    ax_loss = fig.add_subplot(gs[0, 1])
    ax_loss.plot(np.arange(steps), f["loss"], marker="o", ms=3, color="#2c3e50")
    ax_loss.set_xlim(-0.5, steps - 0.5)
    ax_loss.set_xticks([])
    ax_loss.set_title("velocity loss at each step", fontsize=9)
    save_png(fig, path)


def sensitivity_png(summary: Mapping[str, Any], path: str | Path, title: str = "") -> None:
    plt = _plt()
    s = summary["sensitivity"]
    err = np.asarray(s["error"], dtype=float)  # [G, P, S]
    groups = [_short(g) for g in s["group_names"]]
    precisions = s["precisions"]
    n_p = len(precisions)
    chk = s.get("check")
    cols = n_p + (2 if chk else 0)  # a spacer column keeps the colorbar off the scatter plot
    hmap_h = max(2.5, 0.22 * len(groups))
    fig = plt.figure(figsize=(4.2 * (n_p + (1.5 if chk else 0)), hmap_h + 2.2))
    gs = fig.add_gridspec(2, cols, height_ratios=[1, hmap_h], hspace=0.1, wspace=0.4,
                          width_ratios=[1] * n_p + ([0.35, 1.2] if chk else []))
    lo = np.nanmin(_log10(err))
    hi = np.nanmax(_log10(err))
    for k, prec in enumerate(precisions):
        strip = fig.add_subplot(gs[0, k])
        tot = err[:, k].sum(0)
        strip.bar(np.arange(len(tot)), tot, color="#2980b9")
        strip.set_yscale("log")
        strip.set_xticks([])
        strip.set_title(f"{title}{prec}: per-step total", fontsize=9)
        ax = fig.add_subplot(gs[1, k])
        im = ax.imshow(_log10(err[:, k]), aspect="auto", cmap="inferno", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks(range(len(groups)), groups if k == 0 else [""] * len(groups), fontsize=7)
        ax.set_xlabel("step")
        if k == n_p - 1:
            fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="log10 one-step latent MSE")
    if chk:
        ax = fig.add_subplot(gs[:, n_p + 1])
        e2e = np.asarray(chk["end_to_end"], dtype=float)
        for key, label, color in (("velocity_proxy", "one-step error", "#2980b9"),
                                  ("fisher_proxy", "Fisher proxy x dsigma^2", "#c0392b")):
            v = np.asarray([np.nan if x is None else x for x in chk[key]], dtype=float)
            rho = chk["spearman_velocity" if key == "velocity_proxy" else "spearman_fisher"]
            rho_s = "n/a" if rho is None or (isinstance(rho, float) and math.isnan(rho)) else f"{rho:.2f}"
            ax.scatter(e2e, v, s=14, color=color, label=f"{label} (Spearman {rho_s})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("end-to-end final-sample MSE (measured)")
        ax.set_ylabel("proxy (latent MSE units)")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"proxies vs measured ({len(e2e)} triples)", fontsize=9)
    save_png(fig, path)
