"""Figures of the LoRA-Lens paper: spectrum (Fig. 1), RAF vs parameters (Fig. 2),
memory (Fig. 4) and early exit (Fig. 6). Per-layer curves (Figs. 3, 5) use
`lensforge.viz.curves.plot_layer_curves`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lensforge.viz._mpl import pyplot, save_figure
from lensforge.viz.curves import lens_colors

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lensforge.analysis.early_exit_eval import ExitStats
    from lensforge.analysis.memory import MeasuredMemory, MemoryRow
    from lensforge.analysis.spectrum import LensSpectrum
    from lensforge.analysis.sweep import SweepRow

plt = pyplot()


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    return save_figure(fig, path, dpi=130)


def _style(ax: Axes) -> None:
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def plot_spectrum(results: Mapping[str, LensSpectrum], path: str | os.PathLike,
                  title: str | None = None) -> Path:
    """Fig. 1: per-layer effective rank (with 3%·H), energy share of the top 50% of
    components, and participation ratio (with H/2), one line per lens."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = lens_colors(results)
    hidden = {res["hidden_size"] for res in results.values()}
    for name, res in results.items():
        kw = dict(color=colors[name], marker="o", markersize=3, linewidth=1.8)
        axes[0].plot(res["layers"], res["effective_rank"], label=name, **kw)
        axes[1].plot(res["layers"], res["energy_top_half"],
                     label=f"{name} (90% energy: {res['mean']['components_90']:.0f} comp.)", **kw)
        axes[2].plot(res["layers"], res["participation_ratio"], label=name, **kw)
    for h in hidden:
        axes[0].axhline(0.03 * h, color="black", linestyle="--", linewidth=1,
                        label=f"3% of H={h}")
        axes[2].axhline(h / 2, color="black", linestyle="--", linewidth=1, label=f"H/2={h / 2:g}")
    labels = ("(a) effective rank", "(b) energy share of top 50% components",
              "(c) participation ratio")
    for ax, label in zip(axes, labels, strict=True):
        ax.set_title(label)
        ax.set_xlabel("layer")
        _style(ax)
        ax.legend(fontsize=8)
    axes[1].set_ylim(0, 1.02)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_raf_vs_params(rows: Sequence[SweepRow], path: str | os.PathLike,
                       title: str | None = None) -> Path:
    """Fig. 2: RAF against the tuned lens vs trainable parameters (log x), one point per
    LoRA-Lens labelled with k; the tuned lens sits at RAF 0."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lora = sorted((r for r in rows if r["lens_type"] == "lowrank"), key=lambda r: r["parameters"])
    colors = lens_colors([r["lens"] for r in rows])
    if lora:
        ax.plot([r["parameters"] for r in lora], [r["raf"] for r in lora], color="#d94801",
                linewidth=1.2, zorder=1)
    for r in rows:
        if r["lens_type"] == "logit" or r["raf"] is None:
            continue
        ax.scatter(r["parameters"], r["raf"], color=colors[r["lens"]], s=60, zorder=2,
                   edgecolor="black", linewidth=0.5)
        label = f"k={r['k']} (r={r['rank']})" if r["k"] else r["lens"]
        ax.annotate(label, (r["parameters"], r["raf"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("RAF vs tuned lens [nats]")
    ax.set_title(title or "RAF vs parameter count")
    _style(ax)
    return _save(fig, path)


_MEMORY_PARTS: tuple[tuple[Literal["param_bytes", "grad_bytes", "optimizer_bytes"], str], ...] = (
    ("param_bytes", "parameters"), ("grad_bytes", "gradients"),
    ("optimizer_bytes", "optimizer state"))


def plot_memory(rows: Sequence[MemoryRow], path: str | os.PathLike, *,
                measured: Sequence[MeasuredMemory] | None = None, measured_model: str | None = None,
                title: str | None = None) -> Path:
    """Fig. 4: log-scale bytes of parameters, gradients and optimizer state, tuned lens vs
    LoRA-Lens, per model (rows of `memory_table` for one optimizer). `measured` rows
    (from `measure_training_memory`) are drawn as black markers on `measured_model`."""
    models = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    width = 0.4
    x = range(len(models))
    for ax, (key, label) in zip(axes, _MEMORY_PARTS, strict=True):
        ax.bar([i - width / 2 for i in x], [r["tuned"][key] for r in rows], width,
               color="#1f77b4", label="tuned (full rank)")
        ax.bar([i + width / 2 for i in x], [r["lowrank"][key] for r in rows], width,
               color="#f16913", label=f"LoRA-Lens (k={rows[0]['k']})" if rows else "LoRA-Lens")
        if measured and measured_model in models:
            i = models.index(measured_model)
            for m in measured:
                dx = -width / 2 if m["lens_type"] == "tuned" else width / 2
                ax.scatter(i + dx, m[key], marker="x", color="black", s=50, zorder=3,
                           label="measured" if m is measured[0] else None)
        ax.set_yscale("log")
        ax.set_xticks(list(x), models, rotation=60, ha="right", fontsize=8)
        ax.set_title(label)
        _style(ax)
    axes[0].set_ylabel(f"bytes ({rows[0]['optimizer'] if rows else ''})")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_early_exit(curves: Mapping[str, Sequence[ExitStats]], path: str | os.PathLike,
                    title: str | None = None) -> Path:
    """Fig. 6: exit rate, exit precision and fraction of layers skipped vs λ, per lens."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = lens_colors(curves)
    panels: tuple[tuple[Literal["exit_rate", "exit_precision", "layers_skipped"], str], ...] = (
        ("exit_rate", "exit rate"), ("exit_precision", "exit precision"),
        ("layers_skipped", "fraction of layers skipped"))
    for name, curve in curves.items():
        lams = [c["lambda"] for c in curve]
        for ax, (key, _) in zip(axes, panels, strict=True):
            values = [math.nan if c[key] is None else c[key] for c in curve]
            ax.plot(lams, values, color=colors[name], marker="o", markersize=3, label=name)
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_xlabel(r"threshold $\lambda$")
        ax.set_title(label)
        ax.set_ylim(-0.02, 1.02)
        _style(ax)
    axes[1].axhline(0.9, color="black", linestyle="--", linewidth=1, label="90%")
    axes[0].axhline(0.5, color="black", linestyle=":", linewidth=1, label="50%")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
