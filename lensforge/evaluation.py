"""Evaluate any set of lenses per layer on held-out text (the logit lens always included).

model -> hidden states -> each lens -> Readout.metrics (fused, exact) -> accumulator.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lensforge.errors import DataError
from lensforge.lenses import Lens, LogitLens
from lensforge.lenses.readout import Readout
from lensforge.metrics import LayerMetricAccumulator, LayerMetrics, relative_alignment_fidelity
from lensforge.models.adapter import ModelAdapter

_ROW_NAMES = {"kl": "kl", "entropy": "entropy", "ce": "ce", "p1": "precision@1",
              "p5": "precision@5", "surprisal": "surprisal"}


def next_token_targets(batch: Tensor) -> Tensor:
    """[B, T] ids -> [B, T] targets (the next token; -100 at the last position)."""
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]
    return targets


def _split(item: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    if isinstance(item, tuple):
        ids, mask = item
        if mask.shape != ids.shape:
            raise DataError(f"position mask {tuple(mask.shape)} does not match the batch "
                            f"{tuple(ids.shape)}")
        return ids, mask.bool()
    return item, None


@torch.no_grad()
def evaluate(
    adapter: ModelAdapter,
    lenses: Mapping[str, Lens],
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    *,
    max_tokens: int | None = None,
    token_chunk: int | None = None,
    readout: Readout | None = None,
    progress: bool | None = None,
    with_logit: bool = True,
) -> dict[str, LayerMetrics]:
    """Per-layer KL, CE, entropy, P@1, P@5 and surprisal for each lens (nats).

    `batches` yields [B, T] token ids, or (ids, mask) pairs where the Bool mask [B, T]
    keeps the positions to score (e.g. only a generated reply). Returns {lens name:
    accumulator result}; the logit lens is added as "logit" when absent (unless
    `with_logit` is False: a caller that already has its numbers). `progress`:
    a progress bar with tokens/s and ETA on stderr (default: when stderr is a terminal).
    `max_tokens`: score exactly this many positions (the batch that crosses it is cut).
    """
    lenses = dict(lenses)
    if with_logit and not any(isinstance(lens, LogitLens) for lens in lenses.values()):
        lenses = {"logit": LogitLens.from_model(adapter), **lenses}
    readout = readout or Readout(adapter.unembed)
    chunk = token_chunk or readout.block_rows
    L = adapter.n_layers
    accs = {name: LayerMetricAccumulator(L) for name in lenses}
    bar = _progress_bar(progress, max_tokens, len(lenses))
    seen = 0
    for item in batches:
        if max_tokens is not None and seen >= max_tokens:
            break
        ids, mask = _split(item)
        left = None if max_tokens is None else max_tokens - seen
        if left is not None and mask is None and ids.numel() > left:
            ids = ids[: -(-left // ids.shape[-1])]  # no forward pass for rows never scored
        hs = adapter.hidden_states(ids)
        targets = next_token_targets(ids).to(adapter.device)
        if mask is not None:  # score only kept positions: drop the rest before any matmul
            keep = mask.to(hs.device)
            layer_h, final_h, targets = hs[:L][:, keep], hs[L][keep], targets[keep]
        else:
            layer_h, final_h, targets = hs[:L].flatten(1, 2), hs[L].flatten(0, 1), targets.flatten()
        if left is not None and final_h.shape[0] > left:  # the budget ends inside this batch
            layer_h, final_h, targets = layer_h[:, :left], final_h[:left], targets[:left]
        n = final_h.shape[0]
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            target = readout.target(final_h[sl])
            t = targets[sl]
            model_ce = -target.logp.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            model_ce = torch.where(t >= 0, model_ce, torch.nan)
            for name, lens in lenses.items():
                accs[name].add_final_rows(-target.neg_entropy, model_ce)
                x = readout.lens_states(lens, layer_h[:, sl])
                rows = readout.metrics(x, target, t)
                accs[name].add_rows(0, {_ROW_NAMES[k]: v for k, v in vars(rows).items()})
        seen += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    if seen == 0:
        raise DataError("no evaluation data: the held-out source produced no full sequence")
    return {name: acc.result() for name, acc in accs.items()}


class _Bar:
    """A minimal progress line: tokens, lens-tokens/s and ETA (stderr, one line)."""

    def __init__(self, total: int | None, n_lenses: int) -> None:
        self.total, self.n_lenses, self.done, self.t0 = total, n_lenses, 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt
        line = f"\revaluating: {self.done:,} tokens, {rate * self.n_lenses:,.1f} lens-tokens/s"
        if self.total:
            left = max(0, self.total - self.done) / max(rate, 1e-9)
            line += f", {min(100, 100 * self.done / self.total):.0f}%, ETA {left:,.0f} s"
        sys.stderr.write(line + " " * 4)
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _progress_bar(progress: bool | None, total: int | None, n_lenses: int) -> _Bar | None:
    if progress is None:
        progress = sys.stderr.isatty()
    return _Bar(total, n_lenses) if progress else None


def raf_table(results: Mapping[str, Mapping[str, Any]], reference: str) -> dict[str, float]:
    """RAF of every lens against `reference` (mean |KL_l^A - KL_l^B| over layers)."""
    if reference not in results:
        raise DataError(f"no results for reference lens '{reference}'")
    ref = torch.tensor(results[reference]["kl"], dtype=torch.float64)
    return {
        name: relative_alignment_fidelity(torch.tensor(res["kl"], dtype=torch.float64), ref)
        for name, res in results.items()
        if name != reference
    }
