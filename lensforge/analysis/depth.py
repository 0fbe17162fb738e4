"""Prediction depth (Tuned Lens paper §5.3, Table 2 analogue).

A token's prediction depth under a lens is the first layer l such that the lens's top-1
at every layer l' >= l (l' < L) equals the model's final top-1; L if even layer L-1
disagrees. Low depth = the model "knew" its answer early.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch
from torch import Tensor

from lensforge.errors import ConfigError, ShapeError
from lensforge.lenses import Lens
from lensforge.lenses.readout import Readout

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter


class DepthBatch(TypedDict):
    """`depth_batch` of one batch [B, T]: per predicted token [B, T-1]."""

    depth: Tensor  # long, 0..L
    loss: Tensor  # the model's next-token CE (nats)
    correct: Tensor  # bool: the model's top-1 is the next token


class DepthSummary(TypedDict):
    """One lens in `depth_study`'s summary (keys in this order)."""

    mean_depth: float
    mean_depth_fraction: float  # mean depth / L
    never_settles: float  # share of tokens with depth L
    spearman_token: float | None  # None where undefined (NaN)
    p_token: float | None
    spearman_example: float | None
    p_example: float | None
    mean_depth_correct: float | None  # None without such tokens
    mean_depth_wrong: float | None


class DepthInfo(TypedDict):
    n_tokens: int
    n_examples: int
    n_layers: int
    model_mean_loss: float


class DepthStudy(TypedDict):
    """What `depth_study` returns (keys in this order)."""

    summary: dict[str, DepthSummary]
    tokens: dict[str, np.ndarray]  # per token: loss, correct, example, token, depth/<lens>
    info: DepthInfo


def prediction_depth(lens_top1: Tensor, final_top1: Tensor) -> Tensor:
    """lens_top1: [L, ...] top-1 token per layer 0..L-1; final_top1: [...] -> depth [...]
    (long, in 0..L)."""
    if lens_top1.shape[1:] != final_top1.shape:
        raise ShapeError(f"top-1 shapes differ: {tuple(lens_top1.shape)} vs {tuple(final_top1.shape)}")
    agree = (lens_top1 == final_top1.unsqueeze(0)).long()
    # suffix_ok[l] = all layers from l to L-1 agree; it is monotone (0...0 1...1).
    suffix_ok = agree.flip(0).cumprod(0).flip(0)
    return lens_top1.shape[0] - suffix_ok.sum(0)


@torch.no_grad()
def depth_batch(adapter: ModelAdapter, lens: Lens, input_ids: Tensor,
                hidden: Tensor | None = None) -> DepthBatch:
    """For a batch [B, T]: per-token depth [B, T-1], the model's loss on the next token
    [B, T-1] (nats) and whether its top-1 is right [B, T-1]. The last position has no
    next token and is dropped."""
    hs = adapter.hidden_states(input_ids) if hidden is None else hidden
    n_layers = hs.shape[0] - 1
    readout = Readout(adapter.unembed)
    final_logits = readout.final_logprobs(hs[n_layers])[:, :-1]
    final_top1 = final_logits.argmax(-1)
    targets = input_ids[:, 1:].to(final_logits.device)
    loss = torch.nn.functional.cross_entropy(
        final_logits.reshape(-1, final_logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).reshape(targets.shape)
    top1 = torch.stack([lp.argmax(-1) for _, lp in readout.layer_logprobs(lens, hs[:n_layers, :, :-1])])
    return {"depth": prediction_depth(top1, final_top1), "loss": loss,
            "correct": final_top1 == targets}


def depth_study(adapter: ModelAdapter, lenses: dict[str, Lens], batches: Iterable[Tensor], *,
                max_tokens: int) -> DepthStudy:
    """Depths for each lens on up to `max_tokens` predicted tokens. Returns per-token arrays
    ("loss", "correct", "example", "token", "depth/<lens>") and a per-lens summary with
    Spearman ρ between depth and loss, per token and per example (sequence means)."""
    from scipy.stats import spearmanr

    if not lenses:
        raise ConfigError("no lenses to measure prediction depth with")
    cols: dict[str, list[np.ndarray]] = {"loss": [], "correct": [], "example": [], "token": []}
    cols.update({f"depth/{name}": [] for name in lenses})
    seen, example = 0, 0
    for batch in batches:
        hs = adapter.hidden_states(batch)
        first = None
        for name, lens in lenses.items():
            out = depth_batch(adapter, lens, batch, hidden=hs)
            cols[f"depth/{name}"].append(out["depth"].reshape(-1).cpu().numpy())
            first = first or out
        assert first is not None  # lenses is not empty
        B, T1 = first["loss"].shape
        cols["loss"].append(first["loss"].reshape(-1).cpu().numpy())
        cols["correct"].append(first["correct"].reshape(-1).cpu().numpy())
        cols["example"].append(np.repeat(np.arange(example, example + B), T1))
        cols["token"].append(batch[:, 1:].reshape(-1).cpu().numpy())
        example += B
        seen += B * T1
        if seen >= max_tokens:
            break
    if seen == 0:
        raise ConfigError("no tokens to measure (empty data?)")
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    n_layers = adapter.n_layers
    summary: dict[str, DepthSummary] = {}
    for name in lenses:
        depth = arrays[f"depth/{name}"].astype(float)
        ex_depth, ex_loss = _example_means(arrays["example"], depth, arrays["loss"])
        rho_tok, p_tok = spearmanr(depth, arrays["loss"])
        rho_ex, p_ex = spearmanr(ex_depth, ex_loss)
        summary[name] = {
            "mean_depth": float(depth.mean()),
            "mean_depth_fraction": float(depth.mean() / n_layers),
            "never_settles": float((depth == n_layers).mean()),
            "spearman_token": _finite(rho_tok), "p_token": _finite(p_tok),
            "spearman_example": _finite(rho_ex), "p_example": _finite(p_ex),
            "mean_depth_correct": float(depth[arrays["correct"]].mean())
            if arrays["correct"].any() else None,
            "mean_depth_wrong": float(depth[~arrays["correct"]].mean())
            if (~arrays["correct"]).any() else None,
        }
    info: DepthInfo = {"n_tokens": int(len(arrays["loss"])), "n_examples": int(example),
            "n_layers": n_layers, "model_mean_loss": float(arrays["loss"].mean())}
    return {"summary": summary, "tokens": arrays, "info": info}


def _example_means(example: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    counts = np.bincount(example)
    keep = counts > 0
    return [np.bincount(example, weights=v)[keep] / counts[keep] for v in values]


def _finite(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
