"""Figures of the study commands that are not per-layer curves: prediction depth, injection
ROC, static coherence (applications), and causal fidelity, W_U subspace ablations, model
surgery (Tuned Lens §4 and Appendix C). Each takes the study's result dict and a path."""

from __future__ import annotations

import math
import os
from pathlib import Path

from lensforge.viz._mpl import pyplot, save_figure
from lensforge.viz.curves import lens_color


def _rho(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot_depth_hist(result: dict, path: str | os.PathLike, *, title: str) -> Path:
    """Histogram of per-token prediction depth, one outline per lens."""
    import numpy as np

    plt = pyplot()
    n_layers = result["info"]["n_layers"]
    bins = np.arange(n_layers + 2) - 0.5
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, s in result["summary"].items():
        depth = result["tokens"][f"depth/{name}"]
        ax.hist(depth, bins=bins, histtype="step", lw=1.5, color=lens_color(name),
                label=f"{name} (mean {s['mean_depth']:.1f}, ρ={_rho(s['spearman_token'])})")
    ax.set_xlabel(f"prediction depth (layer; {n_layers} = never settles)")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def plot_roc(result: dict, path: str | os.PathLike, *, title: str) -> Path:
    """ROC curve per (features, detector), with the AUROC in the legend."""
    import numpy as np
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for row in result["rows"]:
        s = result["scores"][f"{row['features']}/{row['detector']}"]
        labels = np.r_[np.zeros(len(s["clean"])), np.ones(len(s["injected"]))]
        fpr, tpr, _ = roc_curve(labels, np.r_[s["clean"], s["injected"]])
        style = {"iforest": "-", "lof": "--", "mahalanobis": ":"}[row["detector"]]
        color = "black" if row["features"] == "final_hidden" else lens_color(row["features"])
        ax.plot(fpr, tpr, style, color=color,
                label=f"{row['features']} {row['detector']} ({row['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], color="#cccccc", lw=0.8)
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (injected flagged)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=120)


def plot_static(result: dict, path: str | os.PathLike, *, title: str) -> Path:
    """One panel per kind: coherence vs layer, solid = real vectors, dashed = random."""
    plt = pyplot()
    kinds = result["info"]["kinds"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for lens in dict.fromkeys(r["lens"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["lens"] == lens and r["kind"] == kind]
            xs = [r["layer"] for r in rows]
            ax.plot(xs, [r["coherence_real"] for r in rows], "o-", color=lens_color(lens),
                    label=f"{lens} real")
            ax.plot(xs, [r["coherence_random"] for r in rows], "x--", color=lens_color(lens),
                    label=f"{lens} random")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("mean pairwise cosine")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def plot_causal_fidelity(report: dict, path: str | os.PathLike) -> Path | None:
    """Fig. 20 analogue: per layer, lens influence vs model influence (log-log) with ρ.
    None (no file) when no layer has model influences (run without fidelity)."""
    rows = [r for r in report["layers"] if "model_influence" in r]
    if not rows:
        return None
    plt = pyplot()
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        x = [max(e, 1e-8) for e in row["energies"]]
        y = [max(m, 1e-8) for m in row["model_influence"]]
        ax.scatter(x, y, c=range(len(x)), cmap="viridis", s=22)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"layer {row['layer']}", fontsize=9)
        ax.text(0.04, 0.92, f"ρ = {row['spearman']:.2f}", transform=ax.transAxes, fontsize=9)
        ax.set_xlabel("lens influence [nats]", fontsize=8)
        ax.set_ylabel("model influence [nats]", fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"Causal fidelity ({report['ablation']} ablation): {report['model_id']}",
                 fontsize=10)
    return save_figure(fig, path, dpi=120)


def plot_subspace(results: dict, path: str | os.PathLike) -> Path:
    """Per-layer KL of internal vs output removal: one panel per lens, one for the model."""
    plt = pyplot()
    panels = [(f"lens: {name}", res) for name, res in results["lens"].items()]
    if results.get("residual"):
        panels.append(("model residual stream", results["residual"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, res) in zip(axes[0], panels, strict=True):
        layers = res.get("layers", list(range(len(res["remove_internal"]))))
        ax.plot(layers, res["remove_internal"], "o-", ms=3, label="remove internal")
        ax.plot(layers, res["remove_output"], "s-", ms=3, label="remove output")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("KL(base ‖ ablated) [nats]")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"W_U subspace ablations, output subspace m = {results['m']} of "
                 f"{results['hidden_size']}: {results['model_id']}", fontsize=10)
    return save_figure(fig, path, dpi=120)


def plot_surgery(report: dict, path: str | os.PathLike) -> Path:
    """Fig. 19 analogue: left, cosine(update, gradient) per layer (box: per sequence) with
    the random 5th percentile; right, loss with each block replaced by the identity."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    align = report["alignment"]
    vals = align["per_sequence_values"]
    ax1.boxplot(vals, positions=list(range(len(vals))), whis=(5, 95), showfliers=False)
    ax1.axhline(0, color="grey", lw=0.6)
    base = align["random_baseline_sequence"]
    ax1.axhline(base["p05"], color="red", ls="--", lw=0.8,
                label=f"random 5th pct ({base['p05']:.1e})")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("cos(h_{l+1} − h_l, ∂loss/∂h_l)")
    ax1.set_title("update vs loss gradient (per sequence)", fontsize=9)
    ax1.legend(fontsize=8)
    ax1.set_xticks(range(0, len(vals), max(1, len(vals) // 10)))
    ax1.set_xticklabels(range(0, len(vals), max(1, len(vals) // 10)))
    surg = report["identity"]
    ax2.plot(surg["layers"], surg["loss"], "o-", ms=3, label="block replaced by identity")
    ax2.axhline(surg["baseline"], color="black", ls="--", lw=0.8, label="intact model")
    ax2.set_yscale("log")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("next-token CE [nats]")
    ax2.set_title("loss with one block removed", fontsize=9)
    ax2.legend(fontsize=8)
    fig.suptitle(f"Model surgery checks: {report['model_id']}", fontsize=10)
    return save_figure(fig, path, dpi=120)
