"""Per-layer metric curves: one panel per metric, one line per lens (paper Fig. 3 style)."""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from lensforge.viz._mpl import pyplot, save_figure
from lensforge.viz.offscale import mark_off_scale, readable_ylim

plt = pyplot()

LOGIT_COLOR = "#7f7f7f"
TUNED_COLOR = "#1f77b4"
# Light-to-dark orange/red, so LoRA lenses of growing rank/size read as one family.
LORA_SHADES = ("#fdae6b", "#fd8d3c", "#f16913", "#d94801", "#cb181d", "#a50f15", "#67000d")
OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

METRIC_LABELS = {
    "kl": r"KL($p_L \,\|\, q_\ell$) [nats]",
    "ce": "cross-entropy vs next token [nats]",
    "ppl": "perplexity",
    "entropy": r"entropy $H(q_\ell)$ [nats]",
    "precision@1": "precision@1",
    "precision@5": "precision@5",
    "surprisal": r"surprisal $-\log p_L(\arg\max q_\ell)$ [nats]",
}
# Metrics with a model-own baseline, drawn dashed.
BASELINE_KEYS = {"ce": "model_ce", "ppl": "model_ppl", "entropy": "model_entropy"}
# Losses whose worst lens (the logit lens, early layers) can dwarf the rest: axis clipped.
CLIPPED = ("kl", "ce", "ppl", "surprisal")


def _stable_index(name: str, n: int) -> int:
    return zlib.crc32(name.encode()) % n


def _is_lora(name: str) -> bool:
    return name.lower().startswith("lora") or "lora" in name.lower()


def lens_color(name: str) -> str:
    """Fixed color for a lens name, the same in every plot: logit* grey, tuned* blue,
    lora* an orange/red shade (darker for a larger number in the name, e.g. `lora_k64`),
    anything else a stable pick from a palette without those hues."""
    low = name.lower()
    if _is_lora(low):
        numbers = re.findall(r"\d+", low)
        if numbers:
            # log2 of the number spreads k in {4, 16, 32, 64} / r in {8, ..., 512} across shades.
            value = max(int(numbers[-1]), 1)
            return LORA_SHADES[min(int(math.log2(value)) % len(LORA_SHADES), len(LORA_SHADES) - 1)]
        return LORA_SHADES[3]
    if low.startswith("logit") or low == "identity":
        return LOGIT_COLOR
    if low.startswith("tuned") or "tuned" in low:
        return TUNED_COLOR
    return OTHER_COLORS[_stable_index(name, len(OTHER_COLORS))]


def lens_colors(names: Iterable[str]) -> dict[str, str]:
    """Colors for several lenses at once: `lens_color`, but LoRA lenses that would share a
    shade get distinct shades (ordered by name number, light to dark)."""
    names = list(names)
    colors = {name: lens_color(name) for name in names}
    loras = [n for n in names if _is_lora(n)]
    if len({colors[n] for n in loras}) < len(loras):
        ordered = sorted(loras, key=_lora_sort_key)
        if len(ordered) == 1:
            picks = [3]
        else:
            span = len(LORA_SHADES) - 1
            picks = [round(i * span / (len(ordered) - 1)) for i in range(len(ordered))]
        for name, i in zip(ordered, picks, strict=True):
            colors[name] = LORA_SHADES[i]
    return colors


def _lora_sort_key(name: str) -> tuple[int, str]:
    numbers = re.findall(r"\d+", name)
    return (int(numbers[-1]) if numbers else -1, name)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _positive_span_decades(series: Iterable[list[float]]) -> float:
    positive = [v for s in series for v in s if math.isfinite(v) and v > 0]
    if len(positive) < 2:
        return 0.0
    return math.log10(max(positive) / min(positive))


def _draw_panel(ax: Axes, metric: str, results: dict[str, dict], colors: dict[str, str]) -> None:
    series = {}
    for lens, res in results.items():
        values = res.get(metric)
        if not isinstance(values, list):
            continue
        layers = res.get("layers", list(range(len(values))))
        series[lens] = (layers, _finite(values))
    for lens, (layers, values) in series.items():
        ax.plot(
            layers,
            [v if math.isfinite(v) else math.nan for v in values],  # overflowed ppl: a gap
            color=colors[lens],
            label=lens,
            linewidth=2.0,
            marker="o",
            markersize=3.5,
        )

    baseline_key = BASELINE_KEYS.get(metric)
    if baseline_key is not None:
        baselines = {r.get(baseline_key) for r in results.values()} - {None}
        if len(baselines) == 1:
            baseline = baselines.pop()
            assert baseline is not None  # None was removed
            ax.axhline(
                baseline,
                color="black",
                linestyle="--",
                linewidth=1.3,
                label="model (final layer)",
            )
        else:
            for lens, res in results.items():
                if res.get(baseline_key) is not None:
                    ax.axhline(
                        res[baseline_key],
                        color=colors[lens],
                        linestyle="--",
                        linewidth=1.1,
                        alpha=0.8,
                        label=f"model ({lens})",
                    )

    log = metric in ("kl", "ppl") and _positive_span_decades(v for _, v in series.values()) > 2
    if log:
        ax.set_yscale("log")
    if metric in CLIPPED:
        lines = [r.get(baseline_key) for r in results.values()] if baseline_key else []
        limits = readable_ylim(series, log=log, baselines=[b for b in lines if b is not None])
        if limits is not None:
            mark_off_scale(ax, series, limits, colors)
    if metric.startswith("precision@"):
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=12)
    ax.set_xlabel("layer", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    if series:
        all_layers = sorted({x for layers, _ in series.values() for x in layers})
        if all_layers and len(all_layers) <= 16:
            ax.set_xticks(all_layers)
        ax.set_xlim(all_layers[0] - 0.5, all_layers[-1] + 0.5)


def plot_layer_curves(
    results: dict[str, dict],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("kl", "ce", "entropy", "precision@1"),
    title: str | None = None,
) -> Path:
    """Save a multi-panel PNG of per-layer metrics for several lenses.

    Args:
        results: lens name -> dict with `layers` and per-layer lists (e.g.
            `LayerMetricAccumulator.result()`); None entries are drawn as gaps. `model_ce`,
            `model_entropy`, `model_ppl` are drawn as dashed baselines.
        path: output file; the suffix picks the format (PNG at 150 dpi).
        metrics: one panel per metric, in order; 4 metrics give a 2×2 grid.
        title: optional figure title.

    Returns:
        The written path.
    """
    if not metrics:
        raise ValueError("metrics must name at least one metric to plot")
    n = len(metrics)
    ncols = 2 if n == 4 else min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    colors = lens_colors(results)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        _draw_panel(ax, metric, results, colors)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)

    # One shared legend: same lenses in every panel; baselines appear once.
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    # As many legend columns as the figure's width holds (~1.4 inch per entry).
    per_row = max(1, min(5, int(5.2 * ncols / 1.4)))
    if handles:
        fig.legend(
            handles,
            labels,
            loc="lower center",
            ncol=min(len(labels), per_row),
            fontsize=11,
            frameon=False,
            bbox_to_anchor=(0.5, 0.0),
        )
    if title:
        fig.suptitle(title, fontsize=14)
    legend_rows = math.ceil(len(labels) / per_row) if handles else 0
    fig_height = 3.8 * nrows
    # Reserve ~0.3 inch per legend row below the panels, independent of figure height.
    fig.tight_layout(rect=(0, 0.3 * legend_rows / fig_height, 1, 1))
    return save_figure(fig, path, dpi=150, tight=False, bbox_inches="tight")


# ------------------------------------------------------------------- training panel
def training_kl_series(history: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per lens, (steps, KL) from train_history.json's records: each record's `kl_mean`
    maps lens name -> that step's KL averaged over layers (nats). Records without it (or
    with a non-number for a lens) are skipped for that lens."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for i, record in enumerate(history):
        kl = record.get("kl_mean") if isinstance(record, dict) else None
        if not isinstance(kl, dict):
            continue
        step = record.get("step", i + 1)
        for lens, value in kl.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    math.isfinite(value):
                steps, values = series.setdefault(str(lens), ([], []))
                steps.append(int(step))
                values.append(float(value))
    return series


def plot_training_kl(
    history: Sequence[dict], path: str | os.PathLike
) -> dict[str, tuple[list[int], list[float]]]:
    """Save the training panel: per-step KL (mean over layers) with one line per lens.

    Returns what was drawn, read back from the plotted lines ({} and no file when the
    history holds no per-step KL), so callers and tests see the exact series.
    """
    series = training_kl_series(history)
    if not series:
        return {}
    colors = lens_colors(series)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for lens, (steps, values) in series.items():
        ax.plot(steps, values, color=colors[lens], label=lens, linewidth=1.8, marker="o",
                markersize=3 if max(len(s) for s, _ in series.values()) <= 60 else 0)
    if _positive_span_decades(v for _, v in series.values()) > 2:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("training KL, mean over layers [nats]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    drawn = {line.get_label(): ([int(x) for x in line.get_xdata()],
                                [float(y) for y in line.get_ydata()]) for line in ax.lines}
    save_figure(fig, path, dpi=130)
    return drawn
