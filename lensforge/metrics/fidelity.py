"""Agreement between two lenses' per-layer fidelity curves."""

from __future__ import annotations

from torch import Tensor


def relative_alignment_fidelity(kl_a: Tensor, kl_b: Tensor) -> float:
    """RAF = (1/L) Σ_l |KL_l^A − KL_l^B|, in nats. Lower means the lenses agree more.

    Args:
        kl_a: `[L]` per-layer KL(p_L ‖ q_l) of lens A.
        kl_b: `[L]` per-layer KL of lens B over the same layers.

    >>> import torch
    >>> relative_alignment_fidelity(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0]))
    0.75
    """
    if kl_a.shape != kl_b.shape or kl_a.dim() != 1:
        raise ValueError(
            f"expected two 1-D per-layer KL curves of equal length, got shapes "
            f"{tuple(kl_a.shape)} and {tuple(kl_b.shape)}"
        )
    if kl_a.numel() == 0:
        raise ValueError("RAF of empty KL curves is undefined")
    return (kl_a.double() - kl_b.double()).abs().mean().item()
