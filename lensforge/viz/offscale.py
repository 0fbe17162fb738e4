"""Keep every lens readable when one lens is far off: clip the y-axis, mark what is above.

The logit lens's early layers can reach a perplexity of 1e48 (CE ~110 nats) where a tuned lens
stays near 1e2; on an axis that holds both, the tuned lens is a flat line. The axis top is set
from the per-layer best lens instead, and points above it are drawn as triangles on the top
edge with a note of how many and how far off they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from matplotlib.axes import Axes

# The per-layer best lens (lower envelope) fills at least 1/(1 + HEADROOM) of a clipped axis.
HEADROOM = 2.0
# Clip only when showing everything would need more than WORTH_IT times the clipped range.
WORTH_IT = 2.0
# Smallest envelope span that sets the scale: a decade on a log axis, half its top on a
# linear one, so a flat best lens does not clip everything above it.
_MIN_SPAN_LOG = 1.0
_MIN_SPAN_LINEAR = 0.5
_MARGIN = 0.05  # of the visible span, below the lowest point and above the cap

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # lens -> (layers, values)


def _axis_units(v: float, log: bool) -> float | None:
    """Value in the axis's own units (log10 on a log axis); None where it cannot be drawn."""
    if math.isnan(v) or (log and v <= 0):
        return None
    if math.isinf(v):
        return v
    return math.log10(v) if log else v


def readable_ylim(series: Series, *, log: bool, baselines: Iterable[float] = ()
                  ) -> tuple[float, float, float] | None:
    """(bottom, cap, top) in data units: an axis from bottom to top on which the per-layer
    minimum over lenses and the baselines fill at least 1/(1 + HEADROOM) of the height, and
    `cap` (just under top) where the points above it are marked; None when the full range is
    at most WORTH_IT times that (no clipping needed)."""
    best: dict[float, float] = {}
    top = -math.inf
    for layers, values in series.values():
        for x, v in zip(layers, values, strict=False):
            u = _axis_units(float(v), log)
            if u is None:
                continue
            top = max(top, u)
            if math.isfinite(u):
                best[x] = min(best.get(x, math.inf), u)
    scale = list(best.values()) + [u for b in baselines
                                   if (u := _axis_units(float(b), log)) is not None]
    if not scale:
        return None
    lo, hi = min(scale), max(scale)
    floor = _MIN_SPAN_LOG if log else _MIN_SPAN_LINEAR * abs(hi)
    cap = hi + HEADROOM * max(hi - lo, floor, 1e-12)
    if top <= lo + WORTH_IT * (cap - lo):  # a mild outlier costs less than a clipped axis
        return None
    margin = _MARGIN * (cap - lo)
    limits = (lo - margin, cap, cap + margin)
    return tuple(10.0**u for u in limits) if log else limits


def mark_off_scale(ax: Axes, series: Series, limits: tuple[float, float, float],
                   colors: Mapping[str, str]) -> list[str]:
    """Set the y-axis to `limits` (bottom, cap, top) from `readable_ylim`; draw each point
    above the cap as a triangle at the cap and note, per lens, how many points are off scale
    and the largest. Returns the notes."""
    bottom, cap, top = limits
    ax.set_ylim(bottom, top)
    notes = []
    for lens, (layers, values) in series.items():
        off = [(x, v) for x, v in zip(layers, values, strict=False) if v > cap]
        if not off:
            continue
        ax.plot([x for x, _ in off], [cap] * len(off), linestyle="none", marker="^",
                markersize=7, color=colors[lens], clip_on=False, zorder=5)
        notes.append(f"{lens}: {len(off)} above, max {max(v for _, v in off):.3g}")
    if notes:
        ax.text(0.98, 0.97, "off scale ▲\n" + "\n".join(notes), transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="#333333",
                bbox={"facecolor": "white", "edgecolor": "#cccccc", "alpha": 0.85})
    return notes
