"""Lens confidence checks for early exit, and what each one costs.

A check maps the residual h_j (entering block j) of the token being decoded to the
CALM decision "Δ = p(top-1) − p(top-2) > threshold?" and, on exit, the lens's logits.

- `FullVocabCheck`: the lens's full distribution at every check. Exact, but each check
  is a [1 × V] unembedding (V·H weights read: for SmolLM2-135M, 28 M, as many as 8 of
  its decoder layers; at batch 1 on CPU the cost is the bytes read).
- `ScreenedCheck`: first score only a shortlist S of candidate tokens (|S|·H), and run
  the full check only when the shortlist says "exit". Sound in one direction: if the
  lens's top-1 token is in S, then Δ_S ≥ Δ (the numerator e^{z1} − e^{z2'} can only grow
  when the runner-up is restricted to S, and the normalizer Z_S ≤ Z can only shrink), so
  the screen never rejects an exit the full rule would take. Every exit is confirmed by
  a full check, so exit decisions and exit tokens are exactly the full rule's; the only
  approximation is *missed* exits when the lens's top-1 is outside S (fewer exits,
  never worse agreement). S = the `static` most frequent tokens (by id: BPE vocabularies
  are in merge order, most frequent first) ∪ the prompt's tokens ∪ each emitted token
  and the top-`per_step` tokens of its distribution, capped at `capacity` rows.
- `ShortlistCheck`: the screen alone decides, with no full check: exit iff Δ_S > threshold,
  and the exit token is the shortlist's top-1. Approximate in both directions (the lens's
  top-1 may lie outside S, and Δ_S ≥ Δ makes exits more eager than the full rule), but an
  exit costs no [1 × V] unembedding at all, which is most of what an exit at a late layer
  can save on a small model. Its effect on agreement is measured, not assumed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lensforge.errors import ConfigError
from lensforge.lenses import Lens, LowRankLens


@dataclass
class CheckResult:
    """One check: whether to exit, confidence Δ (of the last stage run), logits [V]."""

    exit: bool
    confidence: float
    logits: Tensor | None
    full: bool  # whether a full [1 × V] unembedding was computed
    top1: int = -1  # the lens's top-1 token id (of the last stage run)


class FullVocabCheck:
    """Δ from the lens's full [V] distribution at every check."""

    name = "full"

    def __init__(self, lens: Lens) -> None:
        self.lens = lens
        self._factors: dict[int, tuple[Tensor, Tensor, Tensor | None] | None] = {}

    def _transform(self, h: Tensor, layer: int) -> Tensor:
        """lens.transform_hidden(h, layer), with a LoRA-Lens's per-layer factors cached as
        contiguous matrices: at batch 1 the strided A_l, B_l views cost more than the
        products themselves."""
        if layer not in self._factors:
            lens, f = self.lens, None
            if isinstance(lens, LowRankLens) and 0 <= layer < lens.n_layers:
                f = (lens.down[layer].detach().t().contiguous(),
                     lens.up[layer].detach().t().contiguous(),
                     None if lens.bias is None else lens.bias[layer].detach())
            self._factors[layer] = f
        f = self._factors[layer]
        if f is None or h.shape[-1] != f[0].shape[0]:
            return self.lens.transform_hidden(h, layer)
        down, up = f[0].to(h.dtype), f[1].to(h.dtype)
        bias = None if f[2] is None else f[2].to(h.dtype)
        out = h + (h @ down) @ up
        return out if bias is None else out + bias

    def reset(self, prompt_ids: Iterable[int]) -> None:
        """Called once per generation, before the first decode step."""

    def observe(self, token: int, logits: Tensor | None) -> None:
        """Called after each emitted token with the logits [V] it came from."""

    @torch.no_grad()
    def __call__(self, h: Tensor, layer: int, threshold: float) -> CheckResult:
        """h: [H] residual entering block `layer` -> exit iff Δ > threshold."""
        logits = self.lens.unembed(self._transform(h, layer)).float()
        top = torch.topk(torch.softmax(logits, dim=-1), 2)
        conf = float(top.values[0] - top.values[1])
        return CheckResult(conf > threshold, conf, logits, True, int(top.indices[0]))


class ScreenedCheck(FullVocabCheck):
    """Shortlist screen (|S|·H), confirmed by a full check only when it says exit."""

    name = "screened"

    def __init__(self, lens: Lens, *, static: int = 1024, per_step: int = 8,
                 capacity: int = 4096) -> None:
        super().__init__(lens)
        if static < 2 or per_step < 0 or capacity < static:
            raise ConfigError(
                f"screened check needs static >= 2, per_step >= 0 and capacity >= static; got "
                f"static={static}, per_step={per_step}, capacity={capacity}")
        self.static, self.per_step, self.capacity = static, per_step, capacity
        unembed = lens.unembed
        vocab, hidden = unembed.weight.shape
        self.capacity = min(capacity, vocab)
        self._weight = unembed.weight.new_empty(self.capacity, hidden)
        self._bias = None if unembed.bias is None else unembed.bias.new_empty(self.capacity)
        self._member = torch.zeros(vocab, dtype=torch.bool, device=unembed.weight.device)
        self._ids = torch.zeros(self.capacity, dtype=torch.long, device=unembed.weight.device)
        self.vocab = vocab
        self.size = 0

    def _add(self, ids: Tensor) -> None:
        """Append token ids not yet in S (as many as fit) with their unembedding rows."""
        ids = torch.unique(ids.reshape(-1).to(self._member.device))
        ids = ids[~self._member[ids]][: self.capacity - self.size]
        if ids.numel() == 0:
            return
        unembed = self.lens.unembed
        end = self.size + ids.numel()
        self._weight[self.size : end] = unembed.weight.index_select(0, ids)
        if self._bias is not None:
            assert unembed.bias is not None  # _bias exists iff the unembedding has a bias
            self._bias[self.size : end] = unembed.bias.index_select(0, ids)
        self._member[ids] = True
        self._ids[self.size : end] = ids
        self.size = end

    def reset(self, prompt_ids: Iterable[int]) -> None:
        self._member.zero_()
        self.size = 0
        self._add(torch.arange(min(self.static, self.capacity)))
        self._add(torch.as_tensor(list(prompt_ids), dtype=torch.long))

    def observe(self, token: int, logits: Tensor | None) -> None:
        new = [torch.tensor([token])]
        if logits is not None and self.per_step:
            new.append(torch.topk(logits.reshape(-1), self.per_step).indices.cpu())
        self._add(torch.cat(new))

    @torch.no_grad()
    def _screen(self, h: Tensor, layer: int) -> tuple[Tensor, float, int]:
        """Lens logits over the shortlist [|S|], their confidence Δ_S and top-1 token id."""
        unembed = self.lens.unembed
        x = unembed.norm(self._transform(h, layer))
        bias = None if self._bias is None else self._bias[: self.size]
        logits = unembed.apply_quirks(
            torch.nn.functional.linear(x, self._weight[: self.size], bias)).float()
        top = torch.topk(torch.softmax(logits, dim=-1), 2)
        return (logits, float(top.values[0] - top.values[1]),
                int(self._ids[int(top.indices[0])]))

    @torch.no_grad()
    def __call__(self, h: Tensor, layer: int, threshold: float) -> CheckResult:
        _, screened, top1 = self._screen(h, layer)
        if not screened > threshold:  # Δ ≤ Δ_S ≤ threshold whenever top-1 ∈ S
            return CheckResult(False, screened, None, False, top1)
        return super().__call__(h, layer, threshold)


class ShortlistCheck(ScreenedCheck):
    """The shortlist screen alone: exit iff Δ_S > threshold, token = the shortlist's top-1.

    On exit, the returned logits are [V] with -inf outside S (so greedy picks the
    shortlist's top-1 and sampling samples within S). No [1 × V] unembedding is ever run.
    """

    name = "shortlist"

    @torch.no_grad()
    def __call__(self, h: Tensor, layer: int, threshold: float) -> CheckResult:
        logits, screened, top1 = self._screen(h, layer)
        if not screened > threshold:
            return CheckResult(False, screened, None, False, top1)
        full = logits.new_full((self.vocab,), float("-inf"))
        full[self._ids[: self.size]] = logits
        return CheckResult(True, screened, full, False, top1)


def make_check(lens: Lens, mode: str = "full", **kwargs: int) -> FullVocabCheck:
    """mode "full" -> FullVocabCheck; "screened" -> ScreenedCheck(**kwargs); "shortlist" ->
    ShortlistCheck(**kwargs)."""
    if mode == "full":
        return FullVocabCheck(lens)
    if mode == "screened":
        return ScreenedCheck(lens, **kwargs)
    if mode == "shortlist":
        return ShortlistCheck(lens, **kwargs)
    raise ConfigError(f"unknown check '{mode}'; use 'full', 'screened' or 'shortlist'")
