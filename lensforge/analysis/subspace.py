"""Unembedding subspace ablations (the research note's H0.1, H0.2 and H1.1; SPEC §7).

The SVD W_U = U Σ Vᵀ (W_U is [V, H]) splits R^H into an *output* subspace, spanned by the
top-m right singular vectors (large σ: direct effect on the logits), and its orthogonal
complement, the *internal* subspace. Per layer l we report

* lens space:     KL(lens(h_l) ‖ unembed(x − P_S x)), x = lens.transform_hidden(h_l),
* residual stream: KL(model ‖ model with h_l ← h_l − P_S h_l),

for S = internal and S = output. Projections act on the residual / lens-aligned state
*before* the final norm (the norm then rescales what is left), so even a direction W_U
ignores changes the logits a little through the norm's scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

import torch
from torch import Tensor

from lensforge.analysis.causal_basis import float32_unembed
from lensforge.errors import ConfigError, DataError
from lensforge.lenses.base import Lens
from lensforge.metrics import kl_from_logprobs
from lensforge.models.adapter import ModelAdapter


def output_basis(w_u: Tensor, m: int | None = None, energy: float | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Right singular vectors of W_U [V, H].

    Returns (Q_out [H, m], Q_int [H, H − m], singular values [H]). The output size m is
    given, or the smallest m whose top singular values hold `energy` of Σσ².
    """
    if (m is None) == (energy is None):
        raise ConfigError("give exactly one of m (output subspace size) or an energy threshold")
    w = w_u.detach().double()
    # Right singular vectors = eigenvectors of the H x H Gram matrix WᵀW (σ² = eigenvalues):
    # a full basis of R^H even when V < H, and never the V x V left factor.
    evals, evecs = torch.linalg.eigh(w.T @ w)
    order = evals.argsort(descending=True)
    sigma = evals[order].clamp_min(0).sqrt()
    v = evecs[:, order]  # [H, H], columns = right singular vectors, descending σ
    width = w.shape[1]
    if m is None:
        assert energy is not None  # exactly one of m, energy (checked above)
        if not 0 < energy <= 1:
            raise ConfigError(f"energy threshold must be in (0, 1], got {energy}")
        cum = (sigma**2).cumsum(0) / (sigma**2).sum()
        m = int((cum < energy - 1e-12).sum()) + 1
    if not 0 < m < width:
        raise ConfigError(f"output subspace size m must be between 1 and H-1 = {width - 1}, got {m}")
    return v[:, :m].float(), v[:, m:].float(), sigma.float()


def remove_subspace(x: Tensor, q: Tensor) -> Tensor:
    """x [..., H] minus its projection on the orthonormal columns of q [H, d]."""
    return x - (x @ q) @ q.T


def ablation_kls(logits_fn: Callable[[Tensor], Tensor], x: Tensor, q_out: Tensor,
                 q_int: Tensor, chunk: int = 512) -> tuple[float, float]:
    """Mean KL(f(x) ‖ f(x − P_int x)) and KL(f(x) ‖ f(x − P_out x)) over tokens x [N, H]."""
    totals = [0.0, 0.0]
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk].float()
            base = torch.log_softmax(logits_fn(xs).float(), -1)
            for j, q in enumerate((q_int, q_out)):
                lp = torch.log_softmax(logits_fn(remove_subspace(xs, q)).float(), -1)
                totals[j] += float(kl_from_logprobs(base, lp).sum())
    return totals[0] / x.shape[0], totals[1] / x.shape[0]


class SubspaceAblation(TypedDict):
    """KL (nats) per layer with the internal / the output subspace removed."""

    remove_internal: list[float]
    remove_output: list[float]


@torch.no_grad()
def lens_subspace_ablation(adapter: ModelAdapter, lens: Lens, batches: Sequence[Tensor],
                           q_out: Tensor, q_int: Tensor) -> SubspaceAblation:
    """Per layer 0..L-1: KL(lens ‖ lens with internal removed), KL(… output removed)."""
    unembed = float32_unembed(adapter)
    L = adapter.n_layers
    sums = torch.zeros(L, 2, dtype=torch.float64)
    n = 0
    for b in batches:
        hs = adapter.hidden_states(b, layers=list(range(L))).flatten(1, 2)
        for layer in range(L):
            x = lens.transform_hidden(hs[layer].float(), layer)
            ki, ko = ablation_kls(unembed, x, q_out, q_int)
            sums[layer] += torch.tensor([ki, ko], dtype=torch.float64) * x.shape[0]
        n += hs.shape[1]
    if n == 0:
        raise DataError("no data for the subspace ablation")
    mean = sums / n
    return {"remove_internal": mean[:, 0].tolist(), "remove_output": mean[:, 1].tolist()}


@torch.no_grad()
def residual_subspace_ablation(adapter: ModelAdapter, batches: Sequence[Tensor],
                               q_out: Tensor, q_int: Tensor,
                               layers: Sequence[int]) -> SubspaceAblation:
    """Per layer in `layers`: KL(model ‖ model with P_S h_l removed in its residual stream)."""
    if not batches:
        raise DataError("no data for the subspace ablation")
    bases = [torch.log_softmax(adapter.model_logits(b).float(), -1) for b in batches]
    n = sum(b.numel() for b in batches)
    out: SubspaceAblation = {"remove_internal": [], "remove_output": []}
    for layer in layers:
        for kls, q in ((out["remove_internal"], q_int), (out["remove_output"], q_out)):
            qd = q.to(adapter.device)

            def edit(h: Tensor, qd: Tensor = qd) -> Tensor:
                return remove_subspace(h.float(), qd).to(h.dtype)

            total = 0.0
            with adapter.edit_residual(layer, edit):
                for b, base in zip(batches, bases, strict=True):
                    lp = torch.log_softmax(adapter.model_logits(b).float(), -1)
                    total += float(kl_from_logprobs(base, lp).sum())
            kls.append(total / n)
    return out

