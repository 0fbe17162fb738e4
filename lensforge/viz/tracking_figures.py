"""Figures of `lensforge track`: the tuned lens's spectrum and each LoRA-Lens's RAF against
training tokens, one line per recipe, beside the LoRA-Lens paper's values."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from matplotlib.ticker import FuncFormatter

from lensforge.analysis.tracking import PAPER, RECIPES, TrackRow
from lensforge.viz._mpl import pyplot

plt = pyplot()

_RECIPE_COLORS = {"tuned-lens": "#d62728", "lora-lens": "#1f77b4", "lensforge": "#2ca02c"}
_K_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_PAPER_STYLE = dict(color="0.35", alpha=0.18, linewidth=0)
_SpectrumPanel = Literal["effective_rank_over_h", "participation_ratio_over_h", "components_90"]


def _x(tokens: int, zero_at: float) -> float:
    """Token 0 (the initial state) cannot sit on a log axis: draw it at `zero_at`."""
    return zero_at if tokens == 0 else float(tokens)


def plot_tracking(rows: Sequence[TrackRow], path: str | os.PathLike, title: str | None = None
                  ) -> Path:
    """Five panels against training tokens (log2): the tuned lens's effective rank and
    participation ratio (% of H) and components for 90% energy, one line per recipe; the
    RAF of each LoRA-Lens against its recipe's tuned lens, one line per recipe and k; the
    held-out KL of every lens beside the logit lens's.
    Shaded: the paper's effective rank < 3% of H, PR ≈ H/2 (a line), RAF 0.12–0.15."""
    fig = tracking_figure(rows, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def tracking_figure(rows: Sequence[TrackRow], title: str | None = None):  # noqa: ANN201
    """The matplotlib Figure of `plot_tracking` (axes in panel order)."""
    positive = sorted({r["tokens"] for r in rows if r["tokens"] > 0})
    zero_at = positive[0] / 2 if positive else 1.0
    recipes = [name for name in RECIPES if any(r["recipe"] == name for r in rows)]
    fig, axes = plt.subplots(1, 5, figsize=(25, 6.4))
    spectrum_panels: tuple[tuple[_SpectrumPanel, float, str], ...] = (
        ("effective_rank_over_h", 100.0, "(a) tuned lens: effective rank, % of H"),
        ("participation_ratio_over_h", 100.0, "(b) tuned lens: participation ratio, % of H"),
        ("components_90", 1.0, "(c) tuned lens: components for 90% energy"))
    for ax, (metric, scale, label) in zip(axes[:3], spectrum_panels, strict=True):
        for recipe in recipes:
            pts = sorted((r["tokens"], r[metric]) for r in rows
                         if r["recipe"] == recipe and r["lens"] == "tuned")
            ax.plot([_x(t, zero_at) for t, _ in pts], [v * scale for _, v in pts],
                    color=_RECIPE_COLORS.get(recipe), marker="o", markersize=4,
                    linewidth=1.8, label=recipe)
        ax.set_title(label, fontsize=10)
    axes[0].axhspan(0, 100 * PAPER["effective_rank_over_h_max"], label="paper: < 3% of H",
                    **_PAPER_STYLE)
    axes[1].axhline(100 * PAPER["participation_ratio_over_h"], color="0.35", linestyle="--",
                    linewidth=1.2, label="paper: ≈ H/2")
    # Scale to the data and the paper's value, so a 1.5% effective rank stays readable.
    for ax, ref in zip(axes[:2], (PAPER["effective_rank_over_h_max"],
                                  PAPER["participation_ratio_over_h"]), strict=True):
        top = max([100 * ref] + [y for line in ax.get_lines() for y in line.get_ydata()])
        ax.set_ylim(0, min(100.0, 1.15 * top))
    ks = sorted({k for r in rows if (k := r.get("k")) is not None})
    for recipe in recipes:
        for i, k in enumerate(ks):
            pts = sorted((r["tokens"], r["raf"]) for r in rows if r["recipe"] == recipe
                         and r.get("k") == k and r["raf"] is not None)
            axes[3].plot([_x(t, zero_at) for t, _ in pts], [v for _, v in pts],
                         color=_RECIPE_COLORS.get(recipe), marker=_K_MARKERS[i % len(_K_MARKERS)],
                         markersize=4, linewidth=1.4, alpha=0.85, label=f"{recipe} k={k}")
    low, high = PAPER["raf"]
    axes[3].axhspan(low, high, label=f"paper: RAF {low}–{high}", **_PAPER_STYLE)
    axes[3].set_title("(d) LoRA-Lens RAF against the recipe's tuned lens", fontsize=10)
    for recipe in recipes:
        lens_k = {r["lens"]: r.get("k") for r in rows if r["recipe"] == recipe}
        for name, k in sorted(lens_k.items(), key=lambda item: item[1] or 0):  # tuned, k up
            pts = sorted((r["tokens"], r["kl"]) for r in rows if r["recipe"] == recipe
                         and r["lens"] == name and r["kl"] is not None)
            marker = "o" if k is None else _K_MARKERS[ks.index(k) % len(_K_MARKERS)]
            axes[4].plot([_x(t, zero_at) for t, _ in pts], [v for _, v in pts],
                         color=_RECIPE_COLORS.get(recipe), marker=marker, markersize=4,
                         linewidth=1.8 if k is None else 1.0,
                         linestyle="-" if k is None else ":",
                         label=f"{recipe} {'tuned' if k is None else f'k={k}'}")
    logit = next((r["kl_logit"] for r in rows if r["kl_logit"] is not None), None)
    if logit is not None:
        axes[4].axhline(logit, color="0.35", linestyle="--", linewidth=1.2,
                        label=f"logit lens {logit:.2f}")
    axes[4].set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axes[4].yaxis.set_major_formatter(plain)
    axes[4].yaxis.set_minor_formatter(plain)
    axes[4].tick_params(axis="y", which="minor", labelsize=7)
    axes[4].set_title("(e) held-out KL, mean over layers (nats)", fontsize=10)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ticks = ([zero_at] if any(r["tokens"] == 0 for r in rows) else []) + positive
        ax.set_xticks(ticks)
        ax.set_xticklabels(["init" if t == zero_at else _tok(t) for t in ticks], fontsize=8,
                           rotation=45)
        ax.set_xlabel("training tokens (lensforge recipe: after the closed form)")
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        # Below the axes, so a dozen recipe x k lines never hide the data.
        n = len(ax.get_legend_handles_labels()[1])
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=3 if n > 6 else 2, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _tok(t: float) -> str:
    t = int(t)
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)
