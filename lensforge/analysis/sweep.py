"""Rank sweep (LoRA-Lens paper Figs. 2 and 3): LoRA-Lenses at several k and the tuned
lens, trained together against one forward pass, scored on the same held-out text.

RAF of each LoRA-Lens against the tuned lens, and its parameter count, trace the
fidelity/size trade-off; per-layer KL of logit, tuned and LoRA lenses is Fig. 3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from lensforge.data import PackedTokenStream, iter_documents
from lensforge.errors import ConfigError
from lensforge.evaluation import evaluate, raf_table
from lensforge.lenses import Lens
from lensforge.training import TrainConfig, train

if TYPE_CHECKING:
    from lensforge.metrics import LayerMetrics
    from lensforge.models.adapter import ModelAdapter

DEFAULT_KS = (4, 16, 32, 64)


class SweepRow(TypedDict):
    """One row of `sweep_summary` (keys in this order)."""

    lens: str
    lens_type: str  # "logit" for the logit lens
    rank: int | None
    k: int | None  # LoRA-Lenses (lora_k<k>) only
    parameters: int
    percent_of_tuned: float | None
    mean_kl: float | None
    raf: float | None  # against the reference; 0.0 for the reference itself


class SweepResult(TypedDict):
    """What `run_sweep` returns (keys in this order)."""

    rows: list[SweepRow]
    results: dict[str, LayerMetrics]  # per lens, in the order logit, tuned, lora_k<k>...
    timings: dict[str, float]  # training timings
    lens_dir: str  # folder of the saved lenses
    config: dict[str, Any]  # the TrainConfig trained with


def sweep_config(base: TrainConfig, ks: Sequence[int]) -> TrainConfig:
    """`base` with lens_types = [tuned] and one LoRA-Lens per k (named lora_k<k>)."""
    if not ks:
        raise ConfigError("give at least one k")
    if len(set(ks)) != len(ks):
        raise ConfigError(f"k values repeat: {list(ks)}")
    return dataclasses.replace(base, lens_types=["tuned"], ranks_k=list(ks), rank=None)


def sweep_summary(results: Mapping[str, Mapping[str, Any]], lenses: Mapping[str, Lens],
                  reference: str = "tuned") -> list[SweepRow]:
    """One row per lens: type, rank, k, parameters, % of the tuned lens's parameters,
    mean KL and RAF against `reference`."""
    raf = raf_table(results, reference)
    ref_params = lenses[reference].num_parameters() if reference in lenses else None
    rows: list[SweepRow] = []
    for name, res in results.items():
        lens = lenses.get(name)
        n_params = lens.num_parameters() if lens is not None else 0
        rows.append({
            "lens": name,
            "lens_type": lens.lens_type if lens is not None else "logit",
            "rank": lens.config.rank if lens is not None else None,
            "k": int(name.removeprefix("lora_k")) if name.startswith("lora_k") else None,
            "parameters": n_params,
            "percent_of_tuned": 100.0 * n_params / ref_params if ref_params else None,
            "mean_kl": res["mean"]["kl"],
            "raf": 0.0 if name == reference else raf.get(name),
        })
    return rows


def run_sweep(adapter: ModelAdapter, cfg: TrainConfig, ks: Sequence[int], *, eval_data: str,
              eval_tokens: int, text_field: str = "text", progress: bool = False,
              eval_seq_len: int | None = None, resume: bool = False) -> SweepResult:
    """Train tuned + LoRA(k for k in ks) in one run, evaluate all on held-out `eval_data`
    (sequences of `eval_seq_len`, default cfg.seq_len). `resume` continues (or, once
    finished, reuses) the training run in cfg.out.

    Returns {"rows": sweep_summary, "results": per-lens evaluate() results,
    "timings": training timings, "lens_dir": folder of the saved lenses}."""
    cfg = sweep_config(cfg, ks)
    trained = train(cfg, adapter, progress=progress, resume=resume)
    stream = PackedTokenStream(lambda: iter_documents(eval_data, text_field=text_field,
                                                      split="heldout"),
                               adapter.tokenizer, eval_seq_len or cfg.seq_len)
    results = evaluate(adapter, trained.lenses, stream.batches(cfg.batch_size),
                       max_tokens=eval_tokens)
    order = ["logit", "tuned"] + [f"lora_k{k}" for k in sorted(ks)]
    results = {name: results[name] for name in order if name in results}
    return {
        "rows": sweep_summary(results, trained.lenses),
        "results": results,
        "timings": trained.timings,
        "lens_dir": str(Path(cfg.out) / "lenses"),
        "config": cfg.to_dict(),
    }
