"""Top-k agreement between a lens and the model's final distribution, and related ranks.

All functions take `[..., V]` logits or log-probs and reduce the last axis. Ranking functions
are invariant to normalization, so either form works.
"""

from __future__ import annotations

from torch import Tensor

from lensforge.metrics._tensor import as_float, log_probs


def precision_at_k(q_logits: Tensor, p_logits: Tensor, k: int) -> Tensor:
    """|topk(q) ∩ topk(p)| / k, the top-k set overlap of two distributions.

    At k = 1 this is top-1 agreement. Ties inside the top-k are broken by `torch.topk`.

    Args:
        q_logits: `[..., V]` lens logits or log-probs.
        p_logits: `[..., V]` final-layer logits or log-probs.
        k: set size, 1 <= k <= V.

    Returns:
        `[...]` float in [0, 1].
    """
    vocab = q_logits.shape[-1]
    if p_logits.shape[-1] != vocab:
        raise ValueError(f"vocab sizes differ: q has {vocab}, p has {p_logits.shape[-1]}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    q_top = q_logits.topk(k, dim=-1).indices
    p_top = p_logits.topk(k, dim=-1).indices
    # topk indices are distinct within a row, so the count of equal pairs is the overlap size.
    overlap = (q_top.unsqueeze(-1) == p_top.unsqueeze(-2)).sum(dim=(-2, -1))
    return overlap.float() / k


def surprisal(q_logits: Tensor, p_logprobs: Tensor) -> Tensor:
    """−log p(argmax q) in nats: how unlikely the final distribution finds the lens's top-1.

    Args:
        q_logits: `[..., V]` lens logits or log-probs.
        p_logprobs: `[..., V]` final-layer logits or log-probs.

    Returns:
        `[...]` non-negative surprisal.
    """
    top1 = q_logits.argmax(dim=-1, keepdim=True)
    return -log_probs(p_logprobs).gather(-1, top1).squeeze(-1)


def target_rank(logits: Tensor, targets: Tensor) -> Tensor:
    """Rank of the true next token, 0 = top: the number of tokens scored strictly higher.

    Args:
        logits: `[..., V]` logits or log-probs.
        targets: Long `[...]` token ids.

    Returns:
        Long `[...]`. Ties count in the target's favour.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    x = as_float(logits)
    target_score = x.gather(-1, targets.long().unsqueeze(-1))
    return (x > target_score).sum(dim=-1)


def top2_gap(logprobs: Tensor) -> Tensor:
    """p(top1) − p(top2), the CALM softmax-response confidence used for early exit.

    Args:
        logprobs: `[..., V]` logits or log-probs, V >= 2.

    Returns:
        `[...]` probability gap in [0, 1].
    """
    top2 = log_probs(logprobs).topk(2, dim=-1).values.exp()
    return top2[..., 0] - top2[..., 1]
