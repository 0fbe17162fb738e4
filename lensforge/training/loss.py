"""The training objective: per-layer KL(p_final || q_l), averaged over tokens.

`kl_loss_backward` is the memory-bounded reference path: it never holds more than one
[chunk x V] block of logits per layer, computes the target's log-probs once per token
chunk (shared by every layer and every lens), and calls backward per block so the
activation memory does not grow with L. Faster paths must match it (tests compare).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lensforge.errors import NonFiniteError
from lensforge.lenses.base import Lens

if TYPE_CHECKING:
    from lensforge.models.adapter import Unembed


def kl_from_logprobs(target_logp: Tensor, lens_logp: Tensor) -> Tensor:
    """KL(p || q) per row in nats. target_logp, lens_logp: [N, V] -> [N]."""
    return (target_logp.exp() * (target_logp - lens_logp)).sum(-1)


def kl_loss_backward(
    lenses: Mapping[str, Lens],
    hs: Tensor,
    final_h: Tensor,
    unembed: Unembed,
    *,
    scale: float = 1.0,
    token_chunk: int = 2048,
    backward: bool = True,
) -> dict[str, Tensor]:
    """Accumulate gradients of mean-over-tokens, sum-over-layers KL for each lens.

    hs: [L, N, H] hidden states entering blocks 0..L-1 (detached);
    final_h: [N, H] pre-norm final residual. Returns per-lens per-layer mean KL [L]
    (detached, fp32). `scale` multiplies the loss (1/accumulation steps).
    """
    L, N, _ = hs.shape
    # Lens math in fp32 (its master weights); the unembedding runs in the model's dtype.
    model_dtype = unembed.weight.dtype
    totals = {name: torch.zeros(L, dtype=torch.float64) for name in lenses}
    for start in range(0, N, token_chunk):
        sl = slice(start, min(N, start + token_chunk))
        with torch.no_grad():
            target_logp = torch.log_softmax(unembed(final_h[sl].to(model_dtype)).float(), dim=-1)
        for name, lens in lenses.items():
            for layer in range(L):
                h = hs[layer, sl].float()
                logits = unembed(lens.transform_hidden(h, layer).to(model_dtype)).float()
                kl = kl_from_logprobs(target_logp, torch.log_softmax(logits, dim=-1))
                loss = kl.sum()
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"non-finite loss at layer {layer} of lens '{name}'; lower the learning "
                        "rate or use --dtype float32"
                    )
                if backward and loss.requires_grad:
                    (loss * (scale / N)).backward()
                totals[name][layer] += float(loss.detach())
    return {name: (t / N).float() for name, t in totals.items()}
