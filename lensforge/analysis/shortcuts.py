"""Latent linear shortcuts (LoRA-Lens paper Fig. 5b): how well each layer's lens already
decodes the model's final answer on instruction data.

Per layer: Precision@1 and Precision@5 (top-k overlap with the final distribution) and
surprisal −log p_L(argmax q_l) in nats; plus each lens's mean gap to a reference lens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from lensforge.analysis.transfer import EvalSequence, evaluate_sequences
from lensforge.lenses import Lens

if TYPE_CHECKING:
    from lensforge.metrics import LayerMetrics
    from lensforge.models.adapter import ModelAdapter

ShortcutMetric = Literal["precision@1", "precision@5", "surprisal"]
SHORTCUT_METRICS: tuple[ShortcutMetric, ...] = ("precision@1", "precision@5", "surprisal")

# Functional syntax: "precision@1" and "first_layer_p1_above_0.8" are not identifiers.
ShortcutMeans = TypedDict("ShortcutMeans", {
    "precision@1": float | None, "precision@5": float | None, "surprisal": float | None,
})
"""The `evaluate` means of the shortcut metrics (None where no layer has a value)."""

ShortcutDifference = TypedDict("ShortcutDifference", {
    "precision@1": float, "precision@5": float, "surprisal": float,
})
"""Mean absolute per-layer difference of a lens to the reference, per shortcut metric."""

_ShortcutLensBase = TypedDict("_ShortcutLensBase", {
    "layers": list[int],
    "precision@1": list[float | None],
    "precision@5": list[float | None],
    "surprisal": list[float | None],
    "mean": ShortcutMeans,
    "n_tokens": int,
})
_ShortcutLensAnalysis = TypedDict("_ShortcutLensAnalysis", {
    "first_layer_p1_above_0.8": int | None,
}, total=False)


class ShortcutLens(_ShortcutLensBase, _ShortcutLensAnalysis):
    """One lens in `shortcut_metrics` (keys in this order); `shortcut_analysis` adds
    "first_layer_p1_above_0.8" (`first_layer_above` of its P@1)."""


class ShortcutMetrics(TypedDict):
    """What `shortcut_metrics` returns (keys in this order)."""

    lenses: dict[str, ShortcutLens]
    reference: str | None
    mean_abs_difference: dict[str, ShortcutDifference]  # every lens but the reference


class ShortcutAnalysis(ShortcutMetrics):
    """What `shortcut_analysis` returns: `shortcut_metrics`, then the full `evaluate`
    results it was computed from."""

    full_results: dict[str, LayerMetrics]


def shortcut_metrics(results: Mapping[str, Mapping[str, Any]],
                     reference: str | None = None) -> ShortcutMetrics:
    """Keep the shortcut metrics of `evaluate` results, and the mean absolute per-layer
    difference of each lens to `reference` (the paper's 'P@1 differences 0.04–0.08')."""
    per_lens: dict[str, ShortcutLens] = {
        name: {"layers": res["layers"], "precision@1": res["precision@1"],
               "precision@5": res["precision@5"], "surprisal": res["surprisal"],
               "mean": {"precision@1": res["mean"]["precision@1"],
                        "precision@5": res["mean"]["precision@5"],
                        "surprisal": res["mean"]["surprisal"]},
               "n_tokens": res["n_tokens"][0] if res["n_tokens"] else 0}
        for name, res in results.items()
    }
    differences: dict[str, ShortcutDifference] = {}
    if reference is not None and reference in per_lens:
        ref = per_lens[reference]

        def mad(res: ShortcutLens, m: ShortcutMetric) -> float:
            # Token metrics are None only for a layer without tokens, which evaluate refuses.
            values, ref_values = cast("list[float]", res[m]), cast("list[float]", ref[m])
            return (sum(abs(a - b) for a, b in zip(values, ref_values, strict=True))
                    / len(ref_values))

        for name, res in per_lens.items():
            if name == reference:
                continue
            differences[name] = {"precision@1": mad(res, "precision@1"),
                                 "precision@5": mad(res, "precision@5"),
                                 "surprisal": mad(res, "surprisal")}
    return {"lenses": per_lens, "reference": reference, "mean_abs_difference": differences}


def first_layer_above(values: Sequence[float | None], threshold: float) -> int | None:
    """First layer whose value exceeds `threshold` (e.g. P@1 > 0.8), or None."""
    return next((i for i, v in enumerate(values) if v is not None and v > threshold), None)


def shortcut_analysis(adapter: ModelAdapter, lenses: Mapping[str, Lens],
                      sequences: Sequence[EvalSequence], *,
                      reference: str | None = None) -> ShortcutAnalysis:
    """Evaluate `lenses` (logit lens added) on `sequences` and return `shortcut_metrics`.
    The reference defaults to the first tuned lens."""
    results = evaluate_sequences(adapter, lenses, sequences)
    if reference is None:
        reference = next((n for n, lens in lenses.items() if lens.lens_type == "tuned"), None)
    out = shortcut_metrics(results, reference)
    for res in out["lenses"].values():
        res["first_layer_p1_above_0.8"] = first_layer_above(res["precision@1"], 0.8)
    return {**out, "full_results": results}
