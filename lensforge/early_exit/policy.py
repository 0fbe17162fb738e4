"""Exit policies: when a token may leave the model at a lens check.

The decoder asks the policy for a threshold before each check (the check exits iff the
lens confidence Δ > threshold) and requires `patience` earlier checks of the same token to
agree on the lens's top-1 before it accepts an exit. `CalmPolicy` is the CALM rule with
optional calibrated per-layer thresholds; tests and experiments pass their own object
(e.g. one that always exits at layer k) through `generate(..., policy=...)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from lensforge.early_exit.rule import calm_threshold, check_lambda
from lensforge.errors import ConfigError


class ExitPolicy(Protocol):
    """What the decoder needs from an exit rule."""

    @property
    def patience(self) -> int:
        """Checks before this one whose top-1 must equal this one's (0: none)."""
        ...

    def threshold(self, step: int, layer: int) -> float:
        """Confidence the check at residual `layer` of generation step `step` must exceed."""
        ...


@dataclass(frozen=True)
class CalmPolicy:
    """CALM: exit at layer j iff Δ_j > max(t_j, 0.9·λ + 0.1·exp(−4·step / N)), with t_j the
    calibrated per-layer threshold where given (see calibrate.py)."""

    lam: float
    avg_input_len: float
    layer_thresholds: Mapping[int, float] = field(default_factory=dict)
    patience: int = 0

    def __post_init__(self) -> None:
        check_lambda(self.lam)
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")
        if self.avg_input_len <= 0:
            raise ConfigError(f"the average input length N must be > 0, got {self.avg_input_len}")

    def threshold(self, step: int, layer: int) -> float:
        calm = calm_threshold(self.lam, step, self.avg_input_len)
        return max(calm, self.layer_thresholds.get(layer, calm))
