"""Model surgery checks (Tuned Lens paper Appendix C, Fig. 19).

1. The model's next-token cross-entropy when block l is replaced by the identity
   (a forward hook that returns the block's input in the block's own output format).
2. Iterative inference: the cosine between each block's residual update
   F_l = h_{l+1} − h_l and the gradient ∂loss/∂h_l, against the cosine of random Gaussian
   vectors of the same dimension (the paper's baseline: the 5th percentile of pairwise
   cosines of 250 random vectors).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TypedDict

import torch
from torch import Tensor, nn

from lensforge.errors import DataError, NonFiniteError, ShapeError
from lensforge.models.adapter import ModelAdapter


def next_token_ce(logits: Tensor, ids: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy (nats) of logits [B, T, V] on ids [B, T], and count."""
    # At least fp32 (fp64 stays fp64, which the finite-difference test relies on).
    lp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)
    target = ids[:, 1:].to(lp.device)
    nll = -lp.gather(-1, target[..., None])[..., 0]
    return nll.sum(), nll.numel()


@contextlib.contextmanager
def identity_block(block: nn.Module) -> Iterator[None]:
    """Make `block` return its input hidden states: HF decoder layers return a tensor or a
    tuple whose first item is the hidden states; both are handled."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        h = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, Tensor):
            return h
        if isinstance(output, tuple):
            return (h, *output[1:])
        raise ShapeError(f"cannot replace a block whose output is {type(output).__name__}")

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class IdentityAblation(TypedDict):
    """`identity_ablation_losses`: mean next-token CE (nats), intact and per ablated block."""

    baseline: float
    layers: list[int]
    loss: list[float]


class CosineQuantiles(TypedDict):
    """`random_cosine_quantiles`: pairwise cosines of random Gaussian vectors."""

    dim: int
    n_vectors: int
    p05: float
    p50: float
    p95: float
    normal_p05: float  # −1.645/√dim


class AlignmentSummary(TypedDict):
    """Cosines of one block's update and gradient, summarized (keys in this order)."""

    mean: float
    p05: float
    median: float
    p95: float
    frac_negative: float


class GradientAlignment(TypedDict):
    """What `gradient_alignment` returns (keys in this order)."""

    per_sequence: list[AlignmentSummary]  # per block
    per_token: list[AlignmentSummary]
    per_sequence_values: list[list[float]]  # per block, one cosine per sequence
    random_baseline_sequence: CosineQuantiles  # in the flattened sequence dimension T·H
    random_baseline_token: CosineQuantiles  # in H


@torch.no_grad()
def identity_ablation_losses(adapter: ModelAdapter, batches: Sequence[Tensor],
                             layers: Sequence[int] | None = None) -> IdentityAblation:
    """Mean next-token CE (nats) of the intact model and with each block in `layers`
    (default all) replaced by the identity: {"baseline": float, "layers": [...],
    "loss": [...]}."""
    if not batches:
        raise DataError("no data for the surgery check")
    layers = list(range(adapter.n_layers)) if layers is None else list(layers)

    def mean_loss() -> float:
        total, count = 0.0, 0
        for b in batches:
            s, c = next_token_ce(adapter.model_logits(b), b)
            total, count = total + float(s), count + c
        if not math.isfinite(total):
            raise NonFiniteError("non-finite loss in the surgery check (try --dtype float32)")
        return total / count

    baseline = mean_loss()
    losses = []
    for layer in layers:
        with identity_block(adapter.layers[layer]):
            losses.append(mean_loss())
    return {"baseline": baseline, "layers": layers, "loss": losses}


def residual_gradients(adapter: ModelAdapter, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One forward + backward pass. Returns (hs [L+1, B, T, H], grads [L+1, B, T, H], loss):
    h_l entering each block (h_L = pre-norm final residual) and ∂loss/∂h_l, where loss is
    the mean next-token CE of the batch (nats)."""
    if ids.dim() == 1:
        ids = ids[None]
    L = adapter.n_layers
    captured: dict[int, Tensor] = {}

    def first(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # The embedding output is not a leaf that requires grad (weights are frozen), so
        # make it one here; every later h_l then hangs off it in the graph.
        if args:
            h = args[0].detach().requires_grad_(True)
            captured[0] = h
            return (h, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = captured[0] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    def grab(idx: int):  # noqa: ANN202 — hook factory
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [adapter.layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [adapter.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True)
                for i in range(1, L)]
    handles.append(adapter.unembed.norm.register_forward_pre_hook(grab(L), with_kwargs=True))
    try:
        with torch.enable_grad():
            logits = adapter.model(input_ids=ids.to(adapter.device), use_cache=False).logits
            total, count = next_token_ce(logits, ids)
            loss = total / count
            hs = [captured[i] for i in range(L + 1)]
            grads = torch.autograd.grad(loss, hs)
    finally:
        for handle in handles:
            handle.remove()
    hs_t = torch.stack([h.detach() for h in hs])
    return hs_t, torch.stack(grads), loss.detach()


def _cos(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def random_cosine_quantiles(dim: int, n_vectors: int = 250, seed: int = 0
                            ) -> CosineQuantiles:
    """5th/50th/95th percentiles of pairwise cosines of `n_vectors` Gaussian vectors in R^dim
    (the paper's baseline), and the normal approximation of the 5th: −1.645/√dim."""
    g = torch.Generator().manual_seed(seed)
    # Fewer vectors in huge dimensions so the sample fits in memory (still >= 190 pairs).
    n = min(n_vectors, max(20, int(5e7 // max(dim, 1))))
    v = torch.randn(n, dim, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    sims = v @ v.T
    iu = torch.triu_indices(v.shape[0], v.shape[0], offset=1)
    cos = sims[iu[0], iu[1]]
    q = torch.quantile(cos, torch.tensor([0.05, 0.5, 0.95], dtype=cos.dtype))
    return {"dim": dim, "n_vectors": int(v.shape[0]), "p05": float(q[0]), "p50": float(q[1]),
            "p95": float(q[2]), "normal_p05": -1.6449 / math.sqrt(dim)}


def gradient_alignment(adapter: ModelAdapter, batches: Sequence[Tensor]) -> GradientAlignment:
    """Per block l: cosine(F_l, ∂loss/∂h_l) per sequence (flattened over tokens, as in the
    paper) and per token. Returns lists per layer plus summary quantiles and the
    random-vector baselines for both dimensions."""
    if not batches:
        raise DataError("no data for the gradient-alignment check")
    L = adapter.n_layers
    per_seq: list[list[float]] = [[] for _ in range(L)]
    per_tok: list[list[float]] = [[] for _ in range(L)]
    seq_dim = None
    for b in batches:
        hs, grads, _ = residual_gradients(adapter, b)
        if not (torch.isfinite(hs).all() and torch.isfinite(grads).all()):
            raise NonFiniteError("non-finite hidden states or gradients (try --dtype float32)")
        updates = hs[1:] - hs[:-1]  # [L, B, T, H]
        g = grads[:L]
        seq_dim = updates.shape[2] * updates.shape[3]
        for layer in range(L):
            per_seq[layer] += _cos(updates[layer].flatten(1), g[layer].flatten(1)).tolist()
            per_tok[layer] += _cos(updates[layer], g[layer]).flatten().tolist()

    def summary(values: list[list[float]]) -> list[AlignmentSummary]:
        out: list[AlignmentSummary] = []
        for vals in values:
            t = torch.tensor(vals, dtype=torch.float64)
            q = torch.quantile(t, torch.tensor([0.05, 0.5, 0.95], dtype=t.dtype))
            out.append({"mean": float(t.mean()), "p05": float(q[0]), "median": float(q[1]),
                        "p95": float(q[2]), "frac_negative": float((t < 0).double().mean())})
        return out

    assert seq_dim is not None  # batches is not empty
    return {
        "per_sequence": summary(per_seq),
        "per_token": summary(per_tok),
        "per_sequence_values": per_seq,
        "random_baseline_sequence": random_cosine_quantiles(seq_dim),
        "random_baseline_token": random_cosine_quantiles(adapter.hidden_size),
    }

