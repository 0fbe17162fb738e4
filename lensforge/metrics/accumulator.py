"""Streaming per-layer lens metrics, token-weighted over any number of batches."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypedDict

import torch
from torch import Tensor

from lensforge.metrics._tensor import log_probs
from lensforge.metrics.agreement import precision_at_k
from lensforge.metrics.divergence import entropy_from_logprobs, kl_from_probs_and_logprobs

# Metrics averaged over every unmasked token, and those only over tokens with a valid target.
_TOKEN_METRICS = ("kl", "entropy", "precision@1", "precision@5", "surprisal")
_TARGET_METRICS = ("ce",)
PER_LAYER_METRICS = ("kl", "ce", "ppl", "entropy", "precision@1", "precision@5", "surprisal")

# What `LayerMetricAccumulator.result()` returns (plain dicts, JSON-able; keys in this order).
# Functional syntax: "precision@1" is not an identifier.
MeanMetrics = TypedDict("MeanMetrics", {
    "kl": float | None, "ce": float | None, "ppl": float | None, "entropy": float | None,
    "precision@1": float | None, "precision@5": float | None, "surprisal": float | None,
})
"""Unweighted average over layers of each per-layer metric (None if no layer has a value)."""

LayerMetrics = TypedDict("LayerMetrics", {
    "layers": list[int],
    "kl": list[float | None],
    "ce": list[float | None],
    "ppl": list[float | None],
    "entropy": list[float | None],
    "precision@1": list[float | None],
    "precision@5": list[float | None],
    "surprisal": list[float | None],
    "n_tokens": list[int],
    "mean": MeanMetrics,
    "model_ce": float | None,
    "model_ppl": float | None,
    "model_entropy": float | None,
    "model_n_tokens": int,
})
"""Per-layer lens metrics (nats) for one lens: see `LayerMetricAccumulator.result`."""


def _flatten(
    logits: Tensor, targets: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """`[..., V]` -> `[N, V]` rows kept by `mask`, with their targets `[N]`."""
    lead = logits.shape[:-1]
    rows = logits.reshape(-1, logits.shape[-1])
    if targets is not None:
        if targets.shape != lead:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} does not match logits leading dims "
                f"{tuple(lead)}"
            )
        targets = targets.reshape(-1)
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match logits leading dims {tuple(lead)}"
            )
        keep = mask.reshape(-1).bool()
        rows = rows[keep]
        targets = targets[keep] if targets is not None else None
    return rows, targets


class LayerMetricAccumulator:
    """Accumulates token-weighted sums of per-layer lens metrics against the final layer.

    Per layer l (lens distribution q_l, model's final distribution p_L), all in nats:
    `kl` = KL(p_L ‖ q_l), `ce` = −log q_l(next token), `entropy` = H(q_l),
    `precision@k` = top-k overlap of q_l and p_L, `surprisal` = −log p_L(argmax q_l).
    Everything is computed in fp32 (fp64 if given fp64) and summed in fp64.

    Targets < 0 (HF's -100) are skipped for CE only; `mask` drops tokens from every metric.

    Example:
        >>> import torch
        >>> acc = LayerMetricAccumulator(n_layers=2)
        >>> final = torch.randn(8, 10)
        >>> final_lp = torch.log_softmax(final, -1)  # computed once, reused across layers
        >>> for layer in range(2):
        ...     acc.update(layer, torch.randn(8, 10), final_logprobs=final_lp)
        >>> acc.update_final(final)
        >>> acc.result()["n_tokens"]
        [8, 8]
    """

    def __init__(self, n_layers: int) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers
        self._cached_key: tuple | None = None
        self._cached_p: Tensor | None = None
        names = _TOKEN_METRICS + _TARGET_METRICS
        self._sums = {name: [0.0] * n_layers for name in names}
        self._count = [0] * n_layers
        self._target_count = [0] * n_layers
        self._model_ce_sum = 0.0
        self._model_entropy_sum = 0.0
        self._model_count = 0
        self._model_target_count = 0

    def update(
        self,
        layer: int,
        lens_logits: Tensor,
        final_logits: Tensor | None = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        final_logprobs: Tensor | None = None,
    ) -> None:
        """Add one batch for one layer.

        Args:
            layer: block index in [0, n_layers).
            lens_logits: `[N, V]` (or `[..., V]`) lens logits q_l, any float dtype.
            final_logits: `[N, V]` model's final logits p_L. May be omitted when
                `final_logprobs` is given.
            targets: Long `[N]` next-token ids; None skips CE.
            mask: Bool `[N]`, True = count this token; None counts all.
            final_logprobs: `[N, V]` `log_softmax(final_logits)`, precomputed once and reused
                across layers to save a V-wide softmax per layer. Takes precedence over
                `final_logits`. Must be unmasked (same rows as `lens_logits`).
        """
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers})")
        if final_logprobs is None:
            if final_logits is None:
                raise ValueError("pass final_logits or final_logprobs")
            final_logprobs = final_logits
            final_is_normalized = False
        else:
            final_is_normalized = True
        if final_logprobs.shape != lens_logits.shape:
            raise ValueError(
                f"lens logits {tuple(lens_logits.shape)} and final logits "
                f"{tuple(final_logprobs.shape)} differ in shape"
            )
        q_rows, row_targets = _flatten(lens_logits, targets, mask)
        p_rows, _ = _flatten(final_logprobs, None, mask)
        n = q_rows.shape[0]
        if n == 0:
            return
        q_lp = log_probs(q_rows)
        p_lp = p_rows if final_is_normalized else log_probs(p_rows)
        p_lp = p_lp.to(q_lp.dtype) if p_lp.dtype != q_lp.dtype else p_lp
        k5 = min(5, q_lp.shape[-1])
        top1 = q_lp.argmax(dim=-1, keepdim=True)
        # exp of the final log-probs is shared by every layer of a chunk: compute it once
        key = (final_logprobs if final_is_normalized and mask is None else None, q_lp.dtype)
        if key[0] is None or self._cached_key is None or self._cached_key[0] is not key[0] \
                or self._cached_key[1] != key[1]:
            self._cached_key, self._cached_p = key, p_lp.exp()
        assert self._cached_p is not None  # set above on the first chunk
        batch = {
            "kl": kl_from_probs_and_logprobs(self._cached_p, p_lp, q_lp),
            "entropy": entropy_from_logprobs(q_lp),
            "precision@1": (top1.squeeze(-1) == p_lp.argmax(dim=-1)).double(),
            "precision@5": precision_at_k(q_lp, p_lp, k5),
            "surprisal": -p_lp.gather(-1, top1).squeeze(-1),
        }
        for name, values in batch.items():
            self._sums[name][layer] += values.double().sum().item()
        self._count[layer] += n

        if row_targets is not None:
            valid = row_targets >= 0
            n_valid = int(valid.sum().item())
            if n_valid:
                ce = -q_lp[valid].gather(-1, row_targets[valid].long().unsqueeze(-1))
                self._sums["ce"][layer] += ce.double().sum().item()
                self._target_count[layer] += n_valid

    def add_rows(self, layer0: int, rows: Mapping[str, Tensor], mask: Tensor | None = None) -> None:
        """Add precomputed per-token metrics for layers layer0 .. layer0 + R - 1.

        rows: "kl", "entropy", "precision@1", "precision@5", "surprisal" and "ce", each
        [R, C] (CE is NaN where a token has no target); mask: Bool [C], True = count.
        The fused path (`Readout.metrics`) produces these; sums are taken in fp64.
        """
        kl = rows["kl"]
        R = kl.shape[0]
        if layer0 < 0 or layer0 + R > self.n_layers:
            raise IndexError(f"layers {layer0}..{layer0 + R - 1} out of range [0, {self.n_layers})")
        keep = None if mask is None else mask.to(kl.device).bool()
        n = kl.shape[1] if keep is None else int(keep.sum().item())
        if n == 0:
            return
        for name in _TOKEN_METRICS:
            values = rows[name] if keep is None else rows[name][:, keep]
            sums = values.double().sum(-1).tolist()
            for i, v in enumerate(sums):
                self._sums[name][layer0 + i] += v
        ce = rows["ce"] if keep is None else rows["ce"][:, keep]
        has = ~torch.isnan(ce)
        ce_sums = torch.where(has, ce.double(), 0.0).sum(-1).tolist()
        ce_counts = has.sum(-1).tolist()
        for i in range(R):
            self._count[layer0 + i] += n
            self._sums["ce"][layer0 + i] += ce_sums[i]
            self._target_count[layer0 + i] += int(ce_counts[i])

    def add_final_rows(self, entropy: Tensor, ce: Tensor, mask: Tensor | None = None) -> None:
        """Add the model's own entropy [C] and next-token CE [C] (NaN = no target)."""
        if mask is not None:
            keep = mask.to(entropy.device).bool()
            entropy, ce = entropy[keep], ce[keep]
        if entropy.numel() == 0:
            return
        self._model_entropy_sum += entropy.double().sum().item()
        self._model_count += entropy.numel()
        has = ~torch.isnan(ce)
        self._model_ce_sum += torch.where(has, ce.double(), 0.0).sum().item()
        self._model_target_count += int(has.sum().item())

    def update_final(
        self,
        final_logits: Tensor | None = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        final_logprobs: Tensor | None = None,
    ) -> None:
        """Add one batch of the model's own output, for the CE / entropy baseline.

        Args:
            final_logits: `[N, V]` model logits (or pass `final_logprobs`).
            targets: Long `[N]` next-token ids; None skips CE. Targets < 0 are skipped.
            mask: Bool `[N]`, True = count this token.
        """
        if final_logprobs is None:
            if final_logits is None:
                raise ValueError("pass final_logits or final_logprobs")
            rows, row_targets = _flatten(final_logits, targets, mask)
            lp = log_probs(rows)
        else:
            lp, row_targets = _flatten(final_logprobs, targets, mask)
        if lp.shape[0] == 0:
            return
        self._model_entropy_sum += entropy_from_logprobs(lp).double().sum().item()
        self._model_count += lp.shape[0]
        if row_targets is not None:
            valid = row_targets >= 0
            if valid.any():
                ce = -lp[valid].gather(-1, row_targets[valid].long().unsqueeze(-1))
                self._model_ce_sum += ce.double().sum().item()
                self._model_target_count += int(valid.sum().item())

    def result(self) -> LayerMetrics:
        """Per-layer means and their averages over layers, as JSON-able python values.

        Returns:
            `layers` (list[int]); per-layer lists (float, or None where a layer saw no tokens
            or no targets) for `kl`, `ce`, `ppl` (= exp(ce)), `entropy`, `precision@1`,
            `precision@5`, `surprisal`; `n_tokens` (list[int] per layer); `mean`: dict of the
            unweighted average over layers that have a value (None if none do);
            `model_ce`, `model_ppl`, `model_entropy` (float or None) and `model_n_tokens` (int).
        """
        per: dict[str, list[float | None]] = {}
        for name in _TOKEN_METRICS:
            per[name] = [
                s / c if c else None for s, c in zip(self._sums[name], self._count, strict=True)
            ]
        per["ce"] = [
            s / c if c else None for s, c in zip(self._sums["ce"], self._target_count, strict=True)
        ]
        per["ppl"] = [_safe_exp(ce) for ce in per["ce"]]
        mean: MeanMetrics = {
            "kl": _mean(per["kl"]), "ce": _mean(per["ce"]), "ppl": _mean(per["ppl"]),
            "entropy": _mean(per["entropy"]), "precision@1": _mean(per["precision@1"]),
            "precision@5": _mean(per["precision@5"]), "surprisal": _mean(per["surprisal"]),
        }
        mt = self._model_target_count
        model_ce = self._model_ce_sum / mt if mt else None
        mc = self._model_count
        return {
            "layers": list(range(self.n_layers)),
            "kl": per["kl"],
            "ce": per["ce"],
            "ppl": per["ppl"],
            "entropy": per["entropy"],
            "precision@1": per["precision@1"],
            "precision@5": per["precision@5"],
            "surprisal": per["surprisal"],
            "n_tokens": list(self._count),
            "mean": mean,
            "model_ce": model_ce,
            "model_ppl": _safe_exp(model_ce),
            "model_entropy": self._model_entropy_sum / mc if mc else None,
            "model_n_tokens": mc,
        }


def _safe_exp(x: float | None) -> float | None:
    """exp for perplexity; None passes through, overflow becomes inf."""
    if x is None:
        return None
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
