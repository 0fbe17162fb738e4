"""Lens confidence checks for early exit, and what each one costs.

A check maps the residual h_j (entering block j) of the token being decoded to a
distribution over candidate tokens and a confidence Δ = p(top-1) − p(top-2).

- `FullVocabCheck`: the lens's full distribution. Exact, but each check is a [1 × V]
  unembedding (V·H multiply-adds: 28 M for SmolLM2-135M, about 8 of its decoder layers).
- `ShortlistCheck(k)`: the first check of a token is a full check; its top-k tokens
  become the token's shortlist, and every later check of that token computes logits
  over the shortlist only (k·H multiply-adds), as in dynamic vocabulary pruning for
  early-exit LMs (Vincenti et al., 2024).

The shortlist approximation: a softmax over k tokens drops the tail mass, so it
*over*-states Δ (Δ_S = Δ · Z/Z_S ≥ Δ). We correct with the tail measured at the first
(full) check: Δ_est = Δ_S · m, where m is the shortlist's probability mass there.
This is exact when the shortlist keeps the same share of mass at later layers, and
conservative when it gains mass with depth (the usual case: later layers are more
confident). The token a shortlisted exit emits is the best shortlist token; a token
outside the shortlist can only be emitted by a full check or by the full model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lensforge.early_exit.rule import top2_gap
from lensforge.errors import ConfigError
from lensforge.lenses import Lens


@dataclass
class CheckResult:
    """One check: confidence Δ, logits over candidates [n], candidate ids [n] (None = all V)."""

    confidence: float
    logits: Tensor
    candidates: Tensor | None

    def greedy_token(self) -> int:
        best = int(torch.argmax(self.logits))
        return best if self.candidates is None else int(self.candidates[best])


class FullVocabCheck:
    """Δ from the lens's full [V] distribution at every check."""

    name = "full"

    def __init__(self, lens: Lens) -> None:
        self.lens = lens

    def start_token(self) -> None:
        """Called before the first check of each new token."""

    @torch.no_grad()
    def __call__(self, h: Tensor, layer: int) -> CheckResult:
        """h: [H] residual entering block `layer` -> CheckResult over all V tokens."""
        logits = self.lens(h, layer).float()
        probs = torch.softmax(logits, dim=-1)
        return CheckResult(float(top2_gap(probs)), logits, None)


class ShortlistCheck:
    """Full check at a token's first check layer, then logits over its top-k only."""

    name = "shortlist"

    def __init__(self, lens: Lens, k: int = 64) -> None:
        if k < 2:
            raise ConfigError(f"the shortlist needs at least 2 tokens, got k={k}")
        self.lens = lens
        self.k = k
        self._ids: Tensor | None = None
        self._weight: Tensor | None = None
        self._bias: Tensor | None = None
        self._mass = 1.0

    def start_token(self) -> None:
        self._ids = None

    @torch.no_grad()
    def __call__(self, h: Tensor, layer: int) -> CheckResult:
        """h: [H] -> CheckResult; over all V at the first call per token, else over k."""
        unembed = self.lens.unembed
        if self._ids is None:
            logits = self.lens(h, layer).float()
            probs = torch.softmax(logits, dim=-1)
            mass, ids = torch.topk(probs, min(self.k, probs.shape[-1]), dim=-1)
            self._ids = ids
            self._mass = float(mass.sum())
            self._weight = unembed.weight.index_select(0, ids)
            self._bias = None if unembed.bias is None else unembed.bias.index_select(0, ids)
            return CheckResult(float(top2_gap(probs)), logits, None)
        x = unembed.norm(self.lens.transform_hidden(h, layer))
        logits = unembed.apply_quirks(torch.nn.functional.linear(x, self._weight, self._bias))
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        return CheckResult(float(top2_gap(probs)) * self._mass, logits, self._ids)


def make_check(lens: Lens, shortlist: int | None) -> FullVocabCheck | ShortlistCheck:
    """`shortlist=None` -> full-vocabulary checks; an int k -> top-k shortlist checks."""
    return FullVocabCheck(lens) if shortlist is None else ShortlistCheck(lens, shortlist)
