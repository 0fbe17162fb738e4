"""Causal basis extraction (CBE) and causal fidelity (Tuned Lens paper §4, Fig. 20).

Per layer, directions u_1..u_k of the residual stream h_l are found greedily: u_i is the
unit vector, orthogonal to u_1..u_{i-1}, whose ablation from h_l most increases
KL(lens(h_l) ‖ lens(ablate(h_l, u))), averaged over tokens. Its *energy* is that KL (nats).

Ablation of a unit direction u replaces the coefficient c = h·u by a target t:
    h' = h − (c − t) u,  t = E[h·u] (mean, default), 0 (zero), or h̃·u for another token h̃
    of the data (resample).

Causal fidelity then ablates each u_i in the model's own residual stream at layer l (a
forward pre-hook, `ModelAdapter.edit_residual`) and measures KL of the model's final
output; the Spearman correlation between lens influence and model influence across the
directions of a layer is the paper's Fig. 20 statistic.

Data flow: model -> cached h_l -> (lens, direction) -> KL. Directions are optimized on the
unit sphere by Adam on an unconstrained vector that is projected onto the orthogonal
complement of the previous directions and normalized at every step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from torch import Tensor, nn

from lensforge.errors import ConfigError, DataError, ShapeError
from lensforge.lenses.base import Lens
from lensforge.metrics import kl_from_logprobs
from lensforge.models.adapter import ModelAdapter, Unembed

ABLATIONS = ("mean", "zero", "resample")
LogitsFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- ablation
def ablation_targets(coeffs: Tensor, mode: str, perm: Tensor | None = None) -> Tensor:
    """Target coefficients t for `coeffs` = h·u of shape [N] (or [N, k]).

    mean: the data mean of h·u; zero: 0; resample: h[perm]·u (another token's value).
    """
    if mode == "mean":
        return coeffs.mean(0, keepdim=True).expand_as(coeffs)
    if mode == "zero":
        return torch.zeros_like(coeffs)
    if mode == "resample":
        if perm is None:
            raise ConfigError("resample ablation needs a permutation of the tokens")
        return coeffs[perm]
    raise ConfigError(f"unknown ablation '{mode}'; choose one of {', '.join(ABLATIONS)}")


def ablate(h: Tensor, u: Tensor, target: Tensor) -> Tensor:
    """h [..., H] with its coefficient along unit u [H] set to target [...]: h − (h·u − t) u."""
    coeff = h @ u
    return h - (coeff - target)[..., None] * u


def resample_permutation(n: int, seed: int = 0) -> Tensor:
    """A fixed derangement-like permutation of n tokens (a cyclic shift of a shuffle), so no
    token is resampled from itself."""
    if n < 2:
        raise DataError("resample ablation needs at least 2 tokens")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(1)
    return perm


# ------------------------------------------------------------------------- lens logits
def float32_unembed(adapter: ModelAdapter) -> Unembed:
    """The model's unembedding (final norm + W_U + quirks) in float32.

    Optimizing through a bf16 unembedding on CPU is slow and imprecise, so half-precision
    models get a float32 copy (W_U is copied, ~V·H·4 bytes)."""
    if adapter.dtype == torch.float32:
        return adapter.unembed
    return copy.deepcopy(adapter.unembed).float()


def lens_logits_fn(lens: Lens, layer: int, unembed: nn.Module) -> LogitsFn:
    """h_l [..., H] -> lens logits [..., V] in float32, through `unembed`."""

    def logits(h: Tensor) -> Tensor:
        return unembed(lens.transform_hidden(h.float(), layer))

    return logits


def restricted_unembed(unembed: Unembed, token_ids: Tensor) -> Unembed:
    """A copy of an Unembed that only computes the logits of `token_ids` (a vocabulary
    subset, for a cheaper optimization surrogate; the norm and quirks are shared)."""
    weight = unembed.weight.detach()[token_ids].float()
    bias = None if unembed.bias is None else unembed.bias.detach()[token_ids].float()
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    head.requires_grad_(False)
    return Unembed(unembed.norm, head, softcap=unembed.softcap, logit_scale=unembed.logit_scale)


def top_tokens(logits_fn: LogitsFn, hidden: Tensor, n_tokens: int, chunk: int = 512) -> Tensor:
    """The `n_tokens` vocabulary ids of largest mean probability under logits_fn(hidden)."""
    with torch.no_grad():
        total = sum(torch.softmax(logits_fn(hidden[s:s + chunk]).float(), -1).sum(0)
                    for s in range(0, hidden.shape[0], chunk))
    assert isinstance(total, Tensor)  # hidden has at least one row
    return total.topk(min(n_tokens, total.shape[0])).indices.sort().values


def mean_kl(logits_fn: LogitsFn, base_logprobs: Tensor, h: Tensor, chunk: int = 512) -> float:
    """Mean over tokens of KL(base ‖ softmax(logits_fn(h))) in nats; h: [N, H]."""
    total = 0.0
    with torch.no_grad():
        for s in range(0, h.shape[0], chunk):
            lp = torch.log_softmax(logits_fn(h[s:s + chunk]).float(), -1)
            total += float(kl_from_logprobs(base_logprobs[s:s + chunk], lp).sum())
    return total / h.shape[0]


# ------------------------------------------------------------------------ extraction
class _BasisRowBase(TypedDict):
    layer: int
    ablation: str
    energies: list[float]
    k: int


class _FidelityKeys(TypedDict, total=False):
    model_influence: list[float]  # KL of the model's output per direction (nats)
    spearman: float  # between energies and model_influence (NaN where undefined)


class CausalBasisRow(_BasisRowBase, _FidelityKeys):
    """One layer of `causal_basis_report` (`CausalBasis.to_dict`, keys in this order),
    plus model_influence and spearman when causal fidelity is measured."""


class CausalBasisReport(TypedDict):
    """What `causal_basis_report` returns (keys in this order)."""

    model_id: str
    ablation: str
    k: int
    steps: int
    lr: float
    tokens_per_step: int
    vocab_subset: int | None
    tokens: int
    layers: list[CausalBasisRow]
    bases: dict[int, Tensor]  # layer -> directions [k, H]; not JSON, saved separately


@dataclass
class CausalBasis:
    """k orthonormal directions of one layer and their energies (mean KL, nats)."""

    layer: int
    directions: Tensor  # [k, H]
    energies: list[float]
    ablation: str
    history: list[list[float]] = field(default_factory=list)  # per direction, KL per step

    def to_dict(self) -> CausalBasisRow:
        return {"layer": self.layer, "ablation": self.ablation, "energies": self.energies,
                "k": len(self.energies)}


def extract_causal_basis(
    logits_fn: LogitsFn,
    hidden: Tensor,
    k: int,
    *,
    ablation: str = "mean",
    steps: int = 200,
    lr: float = 0.05,
    tokens_per_step: int = 256,
    seed: int = 0,
    layer: int = -1,
    chunk: int = 512,
    surrogate_fn: LogitsFn | None = None,
) -> CausalBasis:
    """Greedy CBE on cached hidden states.

    Args:
        logits_fn: h [n, H] -> logits [n, V] (e.g. `lens_logits_fn(lens, l, unembed)`).
        hidden: [N, H] hidden states h_l (float32 is used inside).
        k: number of directions (1 <= k <= H).
        ablation: "mean" (default), "zero" or "resample".
        steps, lr, tokens_per_step: Adam steps per direction, learning rate, and the
            random minibatch of tokens each step uses (the energy is then measured on all N).
        surrogate_fn: optional cheaper logits function used for the gradient steps only
            (e.g. a vocabulary subset, `restricted_unembed`); energies always use logits_fn.

    Returns a CausalBasis whose `directions` are orthonormal and whose energies are the
    mean KL(lens ‖ lens with u_i ablated) over all N tokens.
    """
    if hidden.dim() != 2:
        raise ShapeError(f"hidden states must be [tokens, H], got {tuple(hidden.shape)}")
    n, width = hidden.shape
    if n < 2:
        raise DataError("causal basis extraction needs at least 2 tokens")
    if not 1 <= k <= width:
        raise ConfigError(f"k must be between 1 and the hidden size {width}, got {k}")
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation '{ablation}'; choose one of {', '.join(ABLATIONS)}")
    if steps < 0 or tokens_per_step < 1:
        raise ConfigError("steps must be >= 0 and tokens_per_step >= 1")
    h = hidden.float()
    if not torch.isfinite(h).all():
        raise DataError("NaN/Inf in the hidden states given to causal basis extraction")
    with torch.no_grad():
        base = torch.cat([torch.log_softmax(logits_fn(h[s:s + chunk]).float(), -1)
                          for s in range(0, n, chunk)])
    perm = resample_permutation(n, seed) if ablation == "resample" else None
    mean_h = h.mean(0)
    gen = torch.Generator().manual_seed(seed)
    found: list[Tensor] = []
    energies: list[float] = []
    history: list[list[float]] = []
    batch = min(tokens_per_step, n)
    step_fn = logits_fn if surrogate_fn is None else surrogate_fn

    def project(v: Tensor) -> Tensor:
        for q in found:  # Gram-Schmidt against previous directions (kept orthonormal)
            v = v - (v @ q) * q
        return v / v.norm().clamp_min(1e-12)

    def targets(u: Tensor, idx: Tensor) -> Tensor:
        if ablation == "mean":
            return (mean_h @ u).expand(idx.shape[0])
        if ablation == "zero":
            return torch.zeros(idx.shape[0], dtype=h.dtype)
        assert perm is not None  # ablation == "resample"
        return h[perm[idx]] @ u

    for _ in range(k):
        init = torch.randn(width, generator=gen)
        v = nn.Parameter(init / init.norm())  # unit norm: lr is then a step size on the sphere
        opt = torch.optim.Adam([v], lr=lr)
        trace: list[float] = []
        for _step in range(steps):
            idx = torch.randint(0, n, (batch,), generator=gen)
            u = project(v)
            if surrogate_fn is None:
                base_step = base[idx]
            else:
                with torch.no_grad():
                    base_step = torch.log_softmax(step_fn(h[idx]).float(), -1)
            lp = torch.log_softmax(step_fn(ablate(h[idx], u, targets(u, idx))).float(), -1)
            kl = kl_from_logprobs(base_step, lp).mean()
            opt.zero_grad()
            (-kl).backward()
            opt.step()
            trace.append(float(kl.detach()))
        with torch.no_grad():
            u = project(v.detach())
            u = project(u)  # a second pass keeps orthogonality tight in float32
        found.append(u)
        all_idx = torch.arange(n)
        energies.append(_ablation_kl(logits_fn, base, h, u, targets(u, all_idx), chunk))
        history.append(trace)
    return CausalBasis(layer=layer, directions=torch.stack(found), energies=energies,
                       ablation=ablation, history=history)


def _ablation_kl(logits_fn: LogitsFn, base: Tensor, h: Tensor, u: Tensor, target: Tensor,
                 chunk: int) -> float:
    total = 0.0
    with torch.no_grad():
        for s in range(0, h.shape[0], chunk):
            sl = slice(s, s + chunk)
            lp = torch.log_softmax(logits_fn(ablate(h[sl], u, target[sl])).float(), -1)
            total += float(kl_from_logprobs(base[sl], lp).sum())
    return total / h.shape[0]


# -------------------------------------------------------------------------- fidelity
@torch.no_grad()
def model_influence(
    adapter: ModelAdapter,
    batches: Sequence[Tensor],
    layer: int,
    directions: Tensor,
    *,
    ablation: str = "mean",
    layer_hidden: Tensor | None = None,
    seed: int = 0,
) -> list[float]:
    """Per direction, mean KL(model ‖ model with u ablated from h_layer) over all tokens.

    `batches`: [B, T] token id batches (the same tokens the lens side used). The mean and
    resample targets come from h_layer on these tokens (`layer_hidden` [N, H] if already
    cached, in the batches' order)."""
    if layer_hidden is None:
        layer_hidden = torch.cat([adapter.hidden_states(b, layers=[layer])[0].flatten(0, 1)
                                  for b in batches])
    h = layer_hidden.float()
    n = h.shape[0]
    perm = resample_permutation(n, seed) if ablation == "resample" else None
    bases = [torch.log_softmax(adapter.model_logits(b).float(), -1) for b in batches]
    out: list[float] = []
    for u in directions.float():
        coeff_all = h @ u
        target_all = ablation_targets(coeff_all, ablation, perm)
        total, start = 0.0, 0
        for b, base in zip(batches, bases, strict=True):
            count = b.numel()
            target = target_all[start:start + count].reshape(b.shape).to(adapter.device)
            start += count
            u_m = u.to(adapter.device)

            def edit(x: Tensor, u_m: Tensor = u_m, target: Tensor = target) -> Tensor:
                return ablate(x.float(), u_m, target).to(x.dtype)

            with adapter.edit_residual(layer, edit):
                lp = torch.log_softmax(adapter.model_logits(b).float(), -1)
            total += float(kl_from_logprobs(base, lp).sum())
        out.append(total / n)
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (scipy); NaN when fewer than 3 points or a constant input."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def causal_basis_report(
    adapter: ModelAdapter,
    lens: Lens,
    batches: Sequence[Tensor],
    layers: Sequence[int],
    k: int,
    *,
    ablation: str = "mean",
    steps: int = 200,
    lr: float = 0.05,
    tokens_per_step: int = 256,
    fidelity: bool = True,
    vocab_subset: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> CausalBasisReport:
    """CBE for each layer in `layers`, plus causal fidelity. Returns a JSON-able dict:
    {"layers": [{layer, energies, model_influence, spearman}], settings...} and a
    `bases` entry {layer: directions [k, H]} (tensors, for saving separately)."""
    if not batches:
        raise DataError("no data for causal basis extraction")
    for layer in layers:
        if not 0 <= layer < adapter.n_layers:
            raise ConfigError(f"layer {layer} out of range 0..{adapter.n_layers - 1}")
    unembed = float32_unembed(adapter)
    hs = torch.cat([adapter.hidden_states(b, layers=list(layers)).flatten(1, 2) for b in batches],
                   dim=1)  # [len(layers), N, H]
    rows: list[CausalBasisRow] = []
    bases: dict[int, Tensor] = {}
    for i, layer in enumerate(layers):
        logits_fn = lens_logits_fn(lens, layer, unembed)
        surrogate = None
        if vocab_subset is not None and vocab_subset < adapter.vocab_size:
            ids = top_tokens(logits_fn, hs[i].float(), vocab_subset)
            surrogate = lens_logits_fn(lens, layer, restricted_unembed(unembed, ids))
        basis = extract_causal_basis(logits_fn, hs[i], k,
                                     ablation=ablation, steps=steps, lr=lr,
                                     tokens_per_step=tokens_per_step, seed=seed + layer,
                                     layer=layer, surrogate_fn=surrogate)
        row = basis.to_dict()
        if fidelity:
            infl = model_influence(adapter, batches, layer, basis.directions, ablation=ablation,
                                   layer_hidden=hs[i], seed=seed + layer)
            row["model_influence"] = infl
            row["spearman"] = spearman(basis.energies, infl)
        rows.append(row)
        bases[layer] = basis.directions
        if progress is not None:
            extra = f", spearman {row['spearman']:.2f}" if fidelity else ""
            progress(f"layer {layer}: energies "
                     + " ".join(f"{e:.3f}" for e in basis.energies) + extra)
    return {"model_id": adapter.model_id, "ablation": ablation, "k": k, "steps": steps,
            "lr": lr, "tokens_per_step": tokens_per_step, "vocab_subset": vocab_subset,
            "tokens": int(hs.shape[1]), "layers": rows, "bases": bases}

