"""Static PNG of a prediction-trajectory grid (tuned-lens paper, Figure 1 style).

One panel per lens, rows = layers (model output on top), columns = positions, each cell
colored by a statistic and labelled with its top-1 token; a shared colorbar, so panels
compare. Long inputs are cut to `max_positions` columns (the title says which), keeping
cells wide enough to read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize
from matplotlib.ticker import FuncFormatter

from lensforge.analysis.trajectory import STATS, PredictionTrajectory, short_token
from lensforge.errors import ConfigError
from lensforge.viz._mpl import pyplot, save_figure

plt = pyplot()

# The HTML page's palette (ColorBrewer YlGnBu): light = close to the model, dark = far.
PALETTE = ("#ffffd9", "#edf8b1", "#c7e9b4", "#7fcdbb", "#41b6c4", "#1d91c0", "#225ea8",
           "#253494", "#081d58")
CELL_W, CELL_H = 0.62, 0.25  # inches per cell
CELL_CHARS = 7


def plot_trajectory_grid(
    traj: PredictionTrajectory,
    path: str | os.PathLike,
    *,
    stat: str = "entropy",
    lenses: Sequence[str] | None = None,
    start: int = 0,
    max_positions: int = 48,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """Save the grid of `lenses` (default all) colored by `stat` as a PNG.

    Args:
        traj: the trajectory.
        path: output file.
        stat: one of STATS (entropy, kl, max_prob, ce, rank).
        lenses: panels, top to bottom.
        start, max_positions: the window of positions drawn.
        title: figure title (default: model id and statistic).
    """
    if stat not in STATS:
        raise ConfigError(f"unknown statistic '{stat}'; choose from {', '.join(STATS)}")
    names = list(traj.lenses) if lenses is None else list(lenses)
    missing = [n for n in names if n not in traj.lenses]
    if missing or not names:
        raise ConfigError(f"no lens named {missing} in this trajectory ({', '.join(traj.lenses)})")
    T = traj.n_positions
    if not 0 <= start < T:
        raise ConfigError(f"start must be in [0, {T - 1}], got {start}")
    stop = min(T, start + max(1, max_positions))
    R = traj.n_rows
    lower_is_better = bool(STATS[stat]["lower_is_better"])
    cmap: Colormap = LinearSegmentedColormap.from_list("lensforge", PALETTE if lower_is_better
                                             else PALETTE[::-1])
    cmap = cmap.with_extremes(bad="#e8e8e8")
    lo, hi = traj.stat_range(stat, names)
    log = STATS[stat]["scale"] == "log"  # heavy tails: color log10(1 + x)
    norm = Normalize(vmin=math.log10(1 + lo), vmax=math.log10(1 + hi)) if log else Normalize(
        vmin=lo, vmax=hi)

    n_cols = stop - start
    width = 1.4 + CELL_W * n_cols + 1.3
    panel_h = CELL_H * (R + 2) + 0.5
    fig_h = panel_h * len(names) + 0.9
    fig, axes = plt.subplots(len(names), 1, figsize=(width, fig_h),
                             squeeze=False, gridspec_kw={"hspace": 1.0 / (CELL_H * (R + 2))})
    fig.subplots_adjust(top=1 - 0.75 / fig_h, bottom=0.6 / fig_h)  # before the colorbar
    font = 7.0 if n_cols > 1 else 8.0
    inputs = [short_token(t, CELL_CHARS) for t in traj.tokens[start:stop]]
    nexts = [short_token(traj.text_of(i), CELL_CHARS) if i >= 0 else ""
             for i in traj.targets[start:stop].tolist()]
    image = None
    for i, (ax, name) in enumerate(zip(axes[:, 0], names, strict=True)):
        grid = traj.lenses[name]
        values = grid.stat(stat)[:, start:stop].numpy().astype(float)
        if log:
            values = np.log10(1 + np.clip(values, 0, None))
        shown = values[::-1]  # model output on top, layer 0 at the bottom
        image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        top1 = grid.top_ids[:, start:stop, 0].tolist()
        final = grid.top_ids[R - 1, start:stop, 0].tolist()
        for r in range(R):
            for c in range(n_cols):
                token_id = top1[r][c]
                value = values[r, c]
                x = norm(value) if math.isfinite(value) else 0.0
                dark = (x > 0.55) if lower_is_better else (x < 0.45)
                ax.text(c, R - 1 - r, short_token(traj.text_of(token_id), CELL_CHARS),
                        ha="center", va="center", fontsize=font, family="DejaVu Sans Mono",
                        color="white" if dark else "#111",
                        fontweight="bold" if r < R - 1 and token_id == final[c] else "normal")
        labels = traj.layer_labels[::-1]
        step = 1 if R <= 16 else 2
        ax.set_yticks(range(0, R, step), labels[::step], fontsize=7)
        ax.set_ylabel(f"{name}\nlayer", fontsize=9)
        ax.set_xticks(range(n_cols), inputs, fontsize=font, family="DejaVu Sans Mono",
                      rotation=90 if n_cols > 24 else 0)
        if i == 0:  # the true next tokens, once above the first panel
            top = ax.secondary_xaxis("top")
            top.set_xticks(range(n_cols), nexts, fontsize=font, family="DejaVu Sans Mono",
                           rotation=90 if n_cols > 24 else 0)
            top.tick_params(length=0)
        ax.tick_params(length=0)
        ax.axhline(0.5, color="#333", linewidth=1.2)  # separates the model output row
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[-1, 0].set_xlabel("input token (labels on top: true next token)", fontsize=9)
    label = str(STATS[stat]["label"])
    cbar = fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.9 / width, pad=0.01)
    if log:  # round ticks in the statistic's own units
        ticks = [v for v in (0, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000)
                 if v <= hi]
        cbar.set_ticks([math.log10(1 + v) for v in ticks])
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{10 ** x - 1:.3g}"))
    cbar.set_label(label + (" (log scale" if log else "")
                   + (", clipped at 99th pct)" if stat in ("kl", "ce") else ")" if log else ""),
                   fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    window = "" if (start, stop) == (0, T) else f" · positions {start}–{stop - 1} of {T}"
    fig.suptitle(title or f"{traj.model_id}: top-1 token per layer, colored by {label}{window}",
                 fontsize=10, y=1 - 0.12 / fig_h)
    return save_figure(fig, path, dpi=dpi, tight=False, bbox_inches="tight")
