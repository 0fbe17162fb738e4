"""Lenses: map a layer's hidden state to logits."""

from lensforge.lenses.base import Lens, LensConfig, check_compatible
from lensforge.lenses.io import export_tuned_lens, import_tuned_lens, load_lens, save_lens
from lensforge.lenses.kinds import LENS_TYPES, LogitLens, LowRankLens, TunedLens, resolve_rank

__all__ = [
    "LENS_TYPES", "Lens", "LensConfig", "LogitLens", "LowRankLens", "TunedLens",
    "check_compatible", "export_tuned_lens", "import_tuned_lens", "load_lens",
    "resolve_rank", "save_lens",
]
