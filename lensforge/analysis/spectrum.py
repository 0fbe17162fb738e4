"""Spectral analysis of lens translators (LoRA-Lens paper §2, Fig. 1).

For each layer's translator W_l (tuned lens: the H×H matrix; LoRA-Lens: A_l B_l) we take
the singular values σ_1 ≥ … ≥ σ_n and report:

- effective rank (Roy & Vetterli 2007): exp(−Σ p_i log p_i), p_i = σ_i / Σσ;
- spectral energy ratio: share of the energy Σσ² held by the top ⌊n/2⌋ components;
- components for 90% energy: the smallest m with Σ_{i≤m} σ_i² ≥ 0.9 Σσ²;
- participation ratio: (Σσ²)² / Σσ⁴.

A flat spectrum of rank r has effective rank r and participation ratio r; both are 0 for
an all-zero matrix (an untrained, zero-initialized translator).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypedDict

import torch
from torch import Tensor

from lensforge.errors import ConfigError
from lensforge.lenses import Lens

SpectrumMetric = Literal["effective_rank", "energy_top_half", "components_90",
                         "participation_ratio"]
SPECTRUM_METRICS: tuple[SpectrumMetric, ...] = ("effective_rank", "energy_top_half",
                                                "components_90", "participation_ratio")


class SpectralMetrics(TypedDict):
    """`spectral_metrics` of one spectrum (keys in this order)."""

    effective_rank: float
    energy_top_half: float
    components_90: int
    participation_ratio: float
    n: int


class SpectrumMeans(TypedDict):
    """Unweighted mean over layers of each of `SPECTRUM_METRICS`."""

    effective_rank: float
    energy_top_half: float
    components_90: float
    participation_ratio: float


class LensSpectrum(TypedDict):
    """`lens_spectrum` of one lens (JSON-able; keys in this order)."""

    lens_type: str
    model_id: str
    rank: int | None
    hidden_size: int
    n_layers: int
    layers: list[int]
    effective_rank: list[float]
    energy_top_half: list[float]
    components_90: list[int]
    participation_ratio: list[float]
    mean: SpectrumMeans
    effective_rank_over_h: float
    participation_ratio_over_h: float
    singular_values: list[list[float]]  # per layer, descending


def _sorted_sv(sv: Tensor) -> Tensor:
    if sv.dim() != 1 or sv.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of singular values, got {tuple(sv.shape)}")
    if (sv < 0).any():
        raise ValueError("singular values must be non-negative")
    return sv.double().sort(descending=True).values


def effective_rank(sv: Tensor) -> float:
    """exp of the Shannon entropy (nats) of p_i = σ_i / Σσ; 0 for an all-zero spectrum."""
    s = _sorted_sv(sv)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]  # 0 log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def energy_ratio(sv: Tensor, fraction: float = 0.5) -> float:
    """Share of Σσ² held by the top max(1, ⌊fraction·n⌋) components; 0 when all σ are 0."""
    s = _sorted_sv(sv)
    energy = s**2
    total = energy.sum()
    if total <= 0:
        return 0.0
    m = max(1, int(math.floor(fraction * s.numel())))
    return float(energy[:m].sum() / total)


def components_for_energy(sv: Tensor, threshold: float = 0.9) -> int:
    """Smallest m whose top-m components hold ≥ `threshold` of Σσ²; 0 when all σ are 0."""
    s = _sorted_sv(sv)
    energy = s**2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = energy.cumsum(0) / total
    # A relative tolerance so that e.g. 9 of 10 equal components count as exactly 90%.
    return int((cumulative < threshold - 1e-12).sum()) + 1


def participation_ratio(sv: Tensor) -> float:
    """(Σσ²)² / Σσ⁴; 0 for an all-zero spectrum."""
    s = _sorted_sv(sv)
    e = s**2
    denom = (e**2).sum()
    if denom <= 0:
        return 0.0
    return float(e.sum() ** 2 / denom)


def spectral_metrics(sv: Tensor) -> SpectralMetrics:
    """All four metrics of one spectrum, plus its length n."""
    return {
        "effective_rank": effective_rank(sv),
        "energy_top_half": energy_ratio(sv, 0.5),
        "components_90": components_for_energy(sv, 0.9),
        "participation_ratio": participation_ratio(sv),
        "n": int(sv.numel()),
    }


def translator_singular_values(lens: object, idx: int) -> Tensor:
    """σ of layer idx's translator, in float64, descending."""
    if not hasattr(lens, "translator_matrix"):
        raise ConfigError(
            f"a {getattr(lens, 'lens_type', type(lens).__name__)} lens has no translator matrix; "
            "spectral analysis needs a tuned or LoRA lens"
        )
    matrix = lens.translator_matrix(idx).double().cpu()
    if not torch.isfinite(matrix).all():
        raise ConfigError(f"translator of layer {idx} has NaN/Inf entries")
    return torch.linalg.svdvals(matrix)


def lens_spectrum(lens: Lens) -> LensSpectrum:
    """Per-layer spectral metrics of a lens's translators, their means, and the ratios the
    paper quotes (mean effective rank / H, mean participation ratio / H)."""
    n_layers = lens.config.n_layers
    hidden = lens.config.hidden_size
    per_layer: list[SpectralMetrics] = []
    singular_values = []
    for idx in range(n_layers):
        sv = translator_singular_values(lens, idx)
        singular_values.append([float(x) for x in sv])
        per_layer.append(spectral_metrics(sv))
    effective = [m["effective_rank"] for m in per_layer]
    energy = [m["energy_top_half"] for m in per_layer]
    c90 = [m["components_90"] for m in per_layer]
    participation = [m["participation_ratio"] for m in per_layer]
    mean: SpectrumMeans = {
        "effective_rank": sum(effective) / len(effective),
        "energy_top_half": sum(energy) / len(energy),
        "components_90": sum(c90) / len(c90),
        "participation_ratio": sum(participation) / len(participation),
    }
    return {
        "lens_type": lens.config.lens_type,
        "model_id": lens.config.model_id,
        "rank": lens.config.rank,
        "hidden_size": hidden,
        "n_layers": n_layers,
        "layers": list(range(n_layers)),
        "effective_rank": effective,
        "energy_top_half": energy,
        "components_90": c90,
        "participation_ratio": participation,
        "mean": mean,
        "effective_rank_over_h": mean["effective_rank"] / hidden,
        "participation_ratio_over_h": mean["participation_ratio"] / hidden,
        "singular_values": singular_values,
    }


def write_spectrum(results: Mapping[str, LensSpectrum], out: Path) -> tuple[Path, Path]:
    """spectrum.json (everything, singular values included) and spectrum.csv (long format:
    lens, layer, metric, value; layer 'mean' for the averages)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "spectrum.json", out / "spectrum.csv"
    json_path.write_text(json.dumps(results, indent=2))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("lens", "layer", "metric", "value"))
    for name, res in results.items():
        for metric in SPECTRUM_METRICS:
            for layer, value in zip(res["layers"], res[metric], strict=True):
                writer.writerow((name, layer, metric, value))
            writer.writerow((name, "mean", metric, res["mean"][metric]))
    csv_path.write_text(buf.getvalue())
    return json_path, csv_path
