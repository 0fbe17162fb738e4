"""Shared input handling for the metric functions: dtype promotion and normalization."""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(x: Tensor) -> Tensor:
    """Promote half/bfloat16 to float32 so reductions over V do not lose precision.

    float32 and float64 pass through unchanged (float64 is kept for reference checks).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point logits, got dtype {x.dtype}")
    return x


def log_probs(logits_or_logprobs: Tensor) -> Tensor:
    """`[..., V]` -> `[..., V]` log-probabilities in nats, computed in at least fp32.

    Idempotent: log-probs pass through unchanged up to rounding, so callers may hand in either.
    """
    return torch.log_softmax(as_float(logits_or_logprobs), dim=-1)
