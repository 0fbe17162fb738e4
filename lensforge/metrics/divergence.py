"""Information-theoretic quantities over the vocabulary axis, in nats.

Every function takes logits or log-probs with arbitrary leading dims `[..., V]`, normalizes
them with `log_softmax` (a no-op on log-probs), computes in at least fp32, and reduces the
last axis.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lensforge.metrics._tensor import log_probs


def kl_from_logprobs(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p ‖ q) in nats for already-normalized log-probs `[..., V]` -> `[...]`.

    Terms where p = 0 contribute 0 (not NaN), even where q = 0 too. Skips normalization,
    for hot loops that already hold log-probs; use `kl_divergence` otherwise.
    """
    return kl_from_probs_and_logprobs(p_logprobs.exp(), p_logprobs, q_logprobs)


def kl_from_probs_and_logprobs(p: Tensor, p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p ‖ q) with p = exp(p_logprobs) already computed (reused across layers)."""
    kl = (p * (p_logprobs - q_logprobs)).sum(dim=-1)
    if torch.isfinite(kl).all():  # fast path: one pass, no masking copies
        return kl
    terms = p * (p_logprobs - q_logprobs)
    # 0 * (-inf - x) is NaN in IEEE; the limit p log p -> 0 makes it 0.
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


def entropy_from_logprobs(logprobs: Tensor) -> Tensor:
    """Shannon entropy in nats for already-normalized log-probs `[..., V]` -> `[...]`."""
    p = logprobs.exp()
    ent = -(p * logprobs).sum(dim=-1)
    if torch.isfinite(ent).all():
        return ent
    terms = p * logprobs
    return -torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


def kl_divergence(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) in nats.

    Args:
        p_logprobs: `[..., V]` logits or log-probs of the reference distribution
            (for lens fidelity, the model's final layer p_L).
        q_logprobs: `[..., V]` logits or log-probs of the approximation (the lens q_l).

    Returns:
        `[...]` non-negative KL, fp32 (fp64 if given fp64).

    >>> import torch
    >>> p = torch.tensor([0.5, 0.5]).log()
    >>> round(kl_divergence(p, torch.tensor([0.25, 0.75]).log()).item(), 4)
    0.1438
    """
    if p_logprobs.shape[-1] != q_logprobs.shape[-1]:
        raise ValueError(
            f"vocab sizes differ: p has {p_logprobs.shape[-1]}, q has {q_logprobs.shape[-1]}"
        )
    return kl_from_logprobs(log_probs(p_logprobs), log_probs(q_logprobs))


def entropy(logprobs: Tensor) -> Tensor:
    """Shannon entropy H(q) = −Σ_v q(v) log q(v) in nats: `[..., V]` -> `[...]`.

    >>> import torch
    >>> round(entropy(torch.zeros(4)).item(), 4)  # uniform over 4 tokens: log 4
    1.3863
    """
    return entropy_from_logprobs(log_probs(logprobs))


def cross_entropy(logits_or_logprobs: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy −log q(target) in nats.

    Args:
        logits_or_logprobs: `[..., V]`.
        targets: Long `[...]`, token ids in `[0, V)`. Mask out ignored positions
            (e.g. HF's -100) before calling; this function does not skip them.

    Returns:
        `[...]` cross-entropy per position.
    """
    if targets.shape != logits_or_logprobs.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits leading dims "
            f"{tuple(logits_or_logprobs.shape[:-1])}"
        )
    lp = log_probs(logits_or_logprobs)
    return -lp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
