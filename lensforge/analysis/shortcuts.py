"""Latent linear shortcuts (LoRA-Lens paper Fig. 5b): how well each layer's lens already
decodes the model's final answer on instruction data.

Per layer: Precision@1 and Precision@5 (top-k overlap with the final distribution) and
surprisal −log p_L(argmax q_l) in nats; plus each lens's mean gap to a reference lens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lensforge.analysis.transfer import EvalSequence, evaluate_sequences
from lensforge.lenses import Lens

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

SHORTCUT_METRICS = ("precision@1", "precision@5", "surprisal")


def shortcut_metrics(results: Mapping[str, Mapping[str, Any]], reference: str | None = None) -> dict:
    """Keep the shortcut metrics of `evaluate` results, and the mean absolute per-layer
    difference of each lens to `reference` (the paper's 'P@1 differences 0.04–0.08')."""
    per_lens = {
        name: {"layers": res["layers"], **{m: res[m] for m in SHORTCUT_METRICS},
               "mean": {m: res["mean"][m] for m in SHORTCUT_METRICS},
               "n_tokens": res["n_tokens"][0] if res["n_tokens"] else 0}
        for name, res in results.items()
    }
    differences = {}
    if reference is not None and reference in per_lens:
        ref = per_lens[reference]
        for name, res in per_lens.items():
            if name == reference:
                continue
            differences[name] = {
                m: sum(abs(a - b) for a, b in zip(res[m], ref[m], strict=True)) / len(ref[m])
                for m in SHORTCUT_METRICS
            }
    return {"lenses": per_lens, "reference": reference, "mean_abs_difference": differences}


def first_layer_above(values: Sequence[float], threshold: float) -> int | None:
    """First layer whose value exceeds `threshold` (e.g. P@1 > 0.8), or None."""
    return next((i for i, v in enumerate(values) if v is not None and v > threshold), None)


def shortcut_analysis(adapter: ModelAdapter, lenses: Mapping[str, Lens],
                      sequences: Sequence[EvalSequence], *,
                      reference: str | None = None) -> dict:
    """Evaluate `lenses` (logit lens added) on `sequences` and return `shortcut_metrics`.
    The reference defaults to the first tuned lens."""
    results = evaluate_sequences(adapter, lenses, sequences)
    if reference is None:
        reference = next((n for n, lens in lenses.items() if lens.lens_type == "tuned"), None)
    out = shortcut_metrics(results, reference)
    for res in out["lenses"].values():
        res["first_layer_p1_above_0.8"] = first_layer_above(res["precision@1"], 0.8)
    out["full_results"] = results
    return out
