"""The one place that sets matplotlib's backend; every figure module gets pyplot from here."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_backend_set = False


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the headless Agg backend (figures are files; no display needed)."""
    global _backend_set
    import matplotlib

    if not _backend_set:
        matplotlib.use("Agg")
        _backend_set = True
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int, tight: bool = True,
                bbox_inches: str | None = None) -> Path:
    """Lay out (tight_layout unless `tight=False`), write `path` (its folder made), close."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(out, dpi=dpi, bbox_inches=bbox_inches)
    pyplot().close(fig)
    return out
