"""Evaluate any set of lenses per layer on held-out text (the logit lens always included).

model -> hidden states -> each lens -> metrics accumulator -> per-layer results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lensforge.errors import DataError
from lensforge.lenses import Lens, LogitLens
from lensforge.metrics import LayerMetricAccumulator, relative_alignment_fidelity
from lensforge.models.adapter import ModelAdapter
from lensforge.training.fast_loss import lens_logits_by_layer


def next_token_targets(batch: Tensor) -> Tensor:
    """[B, T] ids -> [B, T] targets (the next token; -100 at the last position)."""
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]
    return targets


@torch.no_grad()
def evaluate(
    adapter: ModelAdapter,
    lenses: Mapping[str, Lens],
    batches: Iterable[Tensor],
    *,
    max_tokens: int | None = None,
    token_chunk: int = 1024,
) -> dict[str, dict]:
    """Per-layer KL, CE, entropy, P@1, P@5 and surprisal for each lens.

    `batches` yields [B, T] token ids. Returns {lens name: accumulator result}; the
    logit lens is added as "logit" when absent. Results carry `n_tokens`.
    """
    lenses = dict(lenses)
    if not any(isinstance(lens, LogitLens) for lens in lenses.values()):
        lenses = {"logit": LogitLens.from_model(adapter), **lenses}
    L = adapter.n_layers
    accs = {name: LayerMetricAccumulator(L) for name in lenses}
    seen = 0
    for batch in batches:
        if max_tokens is not None and seen >= max_tokens:
            break
        hs = adapter.hidden_states(batch)
        targets = next_token_targets(batch).flatten().to(adapter.device)
        layer_h = hs[:L].flatten(1, 2)
        final_h = hs[L].flatten(0, 1)
        for start in range(0, final_h.shape[0], token_chunk):
            sl = slice(start, start + token_chunk)
            final_lp = torch.log_softmax(adapter.unembed(final_h[sl]).float(), dim=-1)
            for name, lens in lenses.items():
                accs[name].update_final(targets=targets[sl], final_logprobs=final_lp)
                # All layers batched through one norm and large unembedding matmuls.
                for layer, logits in lens_logits_by_layer(lens, layer_h[:, sl], adapter.unembed):
                    accs[name].update(layer, logits, targets=targets[sl],
                                      final_logprobs=final_lp)
        seen += batch.numel()
    if seen == 0:
        raise DataError("no evaluation data: the held-out source produced no full sequence")
    return {name: acc.result() for name, acc in accs.items()}


def raf_table(results: Mapping[str, dict], reference: str) -> dict[str, float]:
    """RAF of every lens against `reference` (mean |KL_l^A - KL_l^B| over layers)."""
    if reference not in results:
        raise DataError(f"no results for reference lens '{reference}'")
    ref = torch.tensor(results[reference]["kl"], dtype=torch.float64)
    return {
        name: relative_alignment_fidelity(torch.tensor(res["kl"], dtype=torch.float64), ref)
        for name, res in results.items()
        if name != reference
    }
