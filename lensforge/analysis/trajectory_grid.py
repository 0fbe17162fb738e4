"""One lens's layer × position grid: the statistics of a prediction trajectory, per lens.

`lens_grids` applies lenses to residual streams [L+1, B, T, H] and keeps, per cell, the top-k
tokens and probabilities and the tuned-lens paper's Figure 1 statistics (see STATS). Only
one layer's [B, T, V] log-probs are alive at a time, so a 50k vocabulary and a few thousand
positions fit in memory. `PredictionTrajectory` (trajectory.py) puts the grids of several
lenses on one token sequence together with the decoded tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lensforge.errors import ConfigError, NonFiniteError, ShapeError
from lensforge.lenses import Lens
from lensforge.lenses.readout import Readout
from lensforge.metrics import entropy_from_logprobs, kl_from_logprobs, target_rank
from lensforge.models.adapter import Unembed

# Statistic keys, in display order: a label, whether lower means "closer to the model", and
# the color scale. KL, CE and rank are heavy-tailed (early layers of the logit lens reach
# tens of nats), so they are colored on log10(1 + x) to keep the later layers readable.
STATS: dict[str, dict[str, object]] = {
    "entropy": {"label": "entropy H(q) [nats]", "lower_is_better": True, "scale": "linear"},
    "kl": {"label": "KL(p_L ‖ q) to final [nats]", "lower_is_better": True, "scale": "log"},
    "max_prob": {"label": "top-1 probability", "lower_is_better": False, "scale": "linear"},
    "ce": {"label": "cross-entropy of true next token [nats]", "lower_is_better": True,
           "scale": "log"},
    "rank": {"label": "rank of true next token (0 = top-1)", "lower_is_better": True,
             "scale": "log"},
}


@dataclass
class LensTrajectory:
    """One lens's grid. Shapes: R = n_layers + 1 rows (last = model output), T positions."""

    top_ids: Tensor  # [R, T, k] long
    top_probs: Tensor  # [R, T, k] float32
    entropy: Tensor  # [R, T] nats
    kl: Tensor  # [R, T] nats, KL(p_L ‖ q_l)
    max_prob: Tensor  # [R, T]
    ce: Tensor  # [R, T] nats, NaN where there is no next token
    rank: Tensor  # [R, T] long, -1 where there is no next token

    def stat(self, name: str) -> Tensor:
        """[R, T] float grid of statistic `name` (one of STATS); rank -1 becomes NaN."""
        if name not in STATS:
            raise ConfigError(f"unknown statistic '{name}'; choose from {', '.join(STATS)}")
        value = getattr(self, name).float()
        if name == "rank":
            value = torch.where(self.rank < 0, torch.nan, value)
        return value

    @staticmethod
    def concat(parts: Sequence[LensTrajectory]) -> LensTrajectory:
        """Join trajectories of consecutive position ranges along T."""
        return LensTrajectory(**{
            name: torch.cat([getattr(p, name) for p in parts], dim=1)
            for name in LensTrajectory.__dataclass_fields__
        })


@torch.no_grad()
def lens_grids(hs: Tensor, lenses: Mapping[str, Lens], unembed: Unembed,
               targets: Tensor, top_k: int) -> dict[str, LensTrajectory]:
    """hs [L+1, B, T, H], targets [B, T] (-1 = none) -> name -> LensTrajectory with
    [R, B, T(, k)] tensors (sliced per sequence by the caller)."""
    n_layers = hs.shape[0] - 1
    readout = Readout(unembed)
    final_lp = readout.final_logprobs(hs[n_layers])  # [B, T, V] fp32
    vocab = final_lp.shape[-1]
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"top_k must be in [1, {vocab}], got {top_k}")
    if not torch.isfinite(final_lp).all():
        raise NonFiniteError("NaN/Inf in the model's output logits")
    valid = targets >= 0
    safe_targets = targets.clamp(min=0).to(final_lp.device)
    if int(safe_targets.max()) >= vocab:
        raise ShapeError("a token id is outside the model's vocabulary")
    final_row = _row_stats(final_lp, final_lp, safe_targets, valid, top_k)
    out = {}
    for name, lens in lenses.items():
        rows = [_row_stats(lp, final_lp, safe_targets, valid, top_k)
                for _, lp in readout.layer_logprobs(lens, hs[:n_layers])]
        rows.append(final_row)
        out[name] = LensTrajectory(**{
            key: torch.stack([row[key] for row in rows]).cpu() for key in rows[0]})
    return out


def _row_stats(lp: Tensor, final_lp: Tensor, targets: Tensor, valid: Tensor,
               top_k: int) -> dict[str, Tensor]:
    """One layer: log-probs [B, T, V] -> per-cell statistics [B, T(, k)]."""
    top = lp.topk(top_k, dim=-1)
    valid = valid.to(lp.device)
    ce = -lp.gather(-1, targets[..., None])[..., 0]
    rank = target_rank(lp, targets)
    probs = top.values.exp()
    return {
        "top_ids": top.indices,
        "top_probs": probs,
        "entropy": entropy_from_logprobs(lp),
        "kl": kl_from_logprobs(final_lp, lp),
        "max_prob": probs[..., 0],
        "ce": torch.where(valid, ce, torch.nan),
        "rank": torch.where(valid, rank, -1),
    }


def slice_grid(grid: LensTrajectory, b: int, lo: int, hi: int) -> LensTrajectory:
    """Sequence b's positions [lo, hi) of a batched [R, B, T(, k)] grid."""
    return LensTrajectory(**{name: getattr(grid, name)[:, b, lo:hi]
                             for name in LensTrajectory.__dataclass_fields__})
