"""The CALM exit rule (Schuster et al. 2022; SPEC §5.7), as pure functions.

At generation step i the layers are checked in order, and a token exits at the first
layer whose lens confidence Δ = p(top-1) − p(top-2) satisfies

    Δ > 0.9·λ + 0.1·exp(−4i / N),

with λ ∈ [0, 1] and N the average input length. The decaying term makes the rule
stricter for the first tokens of a generation, when errors hurt most.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lensforge.errors import ConfigError


def check_lambda(lam: float | None) -> float | None:
    """Validate λ: None (exits off) or a finite number in [0, 1]; raises ConfigError."""
    if lam is None:
        return None
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise ConfigError(f"λ must be a number in [0, 1] or None (exits off), got {lam!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(
            f"λ must be in [0, 1] (larger = stricter, fewer exits), got {lam!r}; "
            "use lam=None / --lambda off to switch exits off"
        )
    return value


def calm_threshold(lam: float, step: int, avg_input_len: float) -> float:
    """0.9·λ + 0.1·exp(−4·step / N): the confidence a token at `step` must exceed to exit."""
    if avg_input_len <= 0:
        raise ConfigError(f"the average input length N must be > 0, got {avg_input_len}")
    return 0.9 * lam + 0.1 * math.exp(-4.0 * step / avg_input_len)


def top2_gap(probs: Tensor) -> Tensor:
    """Confidence Δ = p(top-1) − p(top-2) over the last axis: [..., V] -> [...]."""
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top = torch.topk(probs, 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def should_exit(confidence: float, lam: float | None, step: int, avg_input_len: float) -> bool:
    """The CALM decision: exit iff Δ > threshold (never when λ is None)."""
    if lam is None:
        return False
    return confidence > calm_threshold(lam, step, avg_input_len)
