"""Offline early-exit analysis with the CALM rule (LoRA-Lens paper Fig. 6).

At generation step i the layers are checked in order, and the token exits at the first
layer l whose lens confidence Δ_l = p(top1) − p(top2) satisfies

    Δ_l > 0.9·λ + 0.1·exp(−4i / N)          (Schuster et al. 2022)

with λ ∈ [0, 1] and N the average input length. Exit rate = share of tokens that exit
before the last layer; exit precision = share of exited tokens whose exit-layer top-1
equals the full model's top-1. This module only *scores* the rule on recorded lens
outputs; real generation that skips layers lives in `lensforge.early_exit`.

A lens at layer l reads h_l, the residual stream entering block l, so exiting there
runs blocks 0..l−1 and skips L − l of the L blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor

from lensforge.lenses.readout import Readout
from lensforge.metrics import top2_gap

if TYPE_CHECKING:
    from lensforge.analysis.transfer import EvalSequence
    from lensforge.lenses import Lens
    from lensforge.models.adapter import ModelAdapter


# What `exit_stats` returns (keys in this order); functional syntax: "lambda" is a keyword.
ExitStats = TypedDict("ExitStats", {
    "lambda": float,
    "exit_rate": float,  # NaN with no tokens
    "exit_precision": float,  # NaN when no token exits
    "agreement": float,
    "layers_skipped": float,  # mean fraction of the L blocks skipped
    "mean_exit_layer": float,  # over exited tokens; NaN when none exits
    "n_tokens": int,
})
"""The CALM rule scored at one λ: see `exit_stats`."""


def calm_threshold(lam: float, step: Tensor | float, avg_len: float) -> Tensor:
    """0.9·λ + 0.1·exp(−4·i/N) for step index i (scalar or tensor) and average length N."""
    if avg_len <= 0:
        raise ValueError(f"average input length N must be > 0, got {avg_len}")
    step = torch.as_tensor(step, dtype=torch.float64)
    return 0.9 * lam + 0.1 * torch.exp(-4.0 * step / avg_len)


def first_exit_layer(gaps: Tensor, thresholds: Tensor, min_layer: int = 0) -> Tensor:
    """gaps: [T, L] confidence per token and layer; thresholds: [T].

    Returns Long [T]: the first layer l ≥ min_layer with gaps[t, l] > thresholds[t], or
    L where no layer qualifies (the token runs the full model)."""
    n_layers = gaps.shape[1]
    passes = gaps.double() > thresholds.double()[:, None]
    passes[:, :min_layer] = False
    # argmax on int finds the first True; rows with none get L.
    first = passes.int().argmax(dim=1)
    return torch.where(passes.any(dim=1), first, torch.full_like(first, n_layers))


@dataclass
class ExitRecords:
    """Per-token lens outputs needed to score an exit rule.

    gaps: [T, L] top-1 minus top-2 probability of the lens at each layer;
    top1: Long [T, L] lens top-1 token; final_top1: Long [T] model's token;
    steps: [T] step index i of each token; avg_len: N."""

    gaps: Tensor
    top1: Tensor
    final_top1: Tensor
    steps: Tensor
    avg_len: float

    @property
    def n_layers(self) -> int:
        return self.gaps.shape[1]


def exit_stats(records: ExitRecords, lam: float, min_layer: int = 0) -> ExitStats:
    """Exit rate, exit precision, overall agreement and mean fraction of layers skipped
    at one λ. Tokens that never exit run the full model and so agree by construction."""
    L = records.n_layers
    thresholds = calm_threshold(lam, records.steps, records.avg_len)
    layer = first_exit_layer(records.gaps, thresholds, min_layer)
    exited = layer < L
    n = layer.numel()
    n_exit = int(exited.sum())
    safe = layer.clamp(max=L - 1)
    exit_top1 = records.top1.gather(1, safe[:, None]).squeeze(1)
    agree = (exit_top1 == records.final_top1) & exited
    skipped = torch.where(exited, (L - layer).double() / L, torch.zeros(n, dtype=torch.float64))
    return {
        "lambda": float(lam),
        "exit_rate": n_exit / n if n else math.nan,
        "exit_precision": int(agree.sum()) / n_exit if n_exit else math.nan,
        "agreement": (int(agree.sum()) + (n - n_exit)) / n if n else math.nan,
        "layers_skipped": float(skipped.mean()) if n else math.nan,
        "mean_exit_layer": float(layer[exited].double().mean()) if n_exit else math.nan,
        "n_tokens": n,
    }


def exit_curve(records: ExitRecords, lambdas: Sequence[float], min_layer: int = 0) -> list[ExitStats]:
    """`exit_stats` for each λ."""
    return [exit_stats(records, lam, min_layer) for lam in lambdas]


@torch.no_grad()
def collect_exit_records(adapter: ModelAdapter, lens: Lens, sequences: Iterable[EvalSequence],
                         *, token_chunk: int = 512) -> ExitRecords:
    """Run the model over each sequence and record, for positions p ≥ seq.start, the
    lens's Δ and top-1 at every layer and the model's top-1. Step index i = p − start;
    N = the mean of `seq.input_len` (the prompt length when replies were generated)."""
    L = adapter.n_layers
    readout = Readout(adapter.unembed)
    gaps, top1, final, steps, input_lens = [], [], [], [], []
    for seq in sequences:
        start = seq.start
        hs = adapter.hidden_states(seq.ids[None])[:, 0]  # [L+1, T, H]
        hs = hs[:, start:]
        T = hs.shape[1]
        if T == 0:
            continue
        seq_gaps = torch.empty(T, L, dtype=torch.float64)
        seq_top1 = torch.empty(T, L, dtype=torch.long)
        seq_final = torch.empty(T, dtype=torch.long)
        for s in range(0, T, token_chunk):
            sl = slice(s, s + token_chunk)
            seq_final[sl] = readout.final_logprobs(hs[L, sl]).argmax(-1).cpu()
            for layer, logp in readout.layer_logprobs(lens, hs[:L, sl]):
                seq_gaps[sl, layer] = top2_gap(logp).double().cpu()
                seq_top1[sl, layer] = logp.argmax(-1).cpu()
        gaps.append(seq_gaps)
        top1.append(seq_top1)
        final.append(seq_final)
        steps.append(torch.arange(T, dtype=torch.float64))
        input_lens.append(seq.input_len)
    if not gaps:
        from lensforge.errors import DataError

        raise DataError("no tokens to analyse: every sequence was empty past its start")
    avg_len = sum(input_lens) / len(input_lens)
    return ExitRecords(torch.cat(gaps), torch.cat(top1), torch.cat(final), torch.cat(steps),
                       float(avg_len))
