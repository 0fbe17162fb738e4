"""lensforge shortcuts: per-layer Precision@1/5 and surprisal on instructions (Fig. 5b).

Per-layer Precision@1, Precision@5 and surprisal -log p_L(argmax q_l) of each lens (logit lens
included) on instruction data (scored on the model's greedy reply when --new-tokens > 0, else
on every position), and each lens's mean difference to a reference lens. Writes
OUT/shortcuts.json, metrics.json/csv and shortcuts.png.
"""

from __future__ import annotations

import argparse
from typing import Any

from lensforge.analysis.shortcuts import shortcut_analysis
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.cli.study_inputs import add_sequence_args, sequences_from_args
from lensforge.viz.curves import plot_layer_curves


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "shortcuts", run_shortcuts, __doc__, out="shortcuts", lenses="*",
                     mismatch=True, lens_help="lens folders, as PATH or NAME=PATH",
                     help="latent linear shortcuts: per-layer P@1, P@5, surprisal")
    p.add_argument("--reference", help="lens to compare against")
    add_sequence_args(p)


def run_shortcuts(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    lenses = study.lenses(logit=False)  # shortcut_analysis adds the logit lens
    seqs, described = sequences_from_args(args, adapter)
    result = shortcut_analysis(adapter, lenses, seqs, reference=args.reference)
    full_results = result["full_results"]
    summary: dict[str, Any] = {k: v for k, v in result.items() if k != "full_results"}
    summary["data"] = described
    summary["model"] = adapter.model_id
    report = Report()
    report.json("shortcuts.json", summary)
    report.layer_metrics(full_results)
    report.figure("shortcuts.png", plot_layer_curves, result["lenses"],
                  metrics=("precision@1", "precision@5", "surprisal"),
                  title=f"{adapter.model_id}: latent linear shortcuts")
    report.print(f"data: {described}", Table(
        [Column("lens", "<14"), Column("P@1", ">7.3f"), Column("P@5", ">7.3f"),
         Column("surpr.", ">8.2f"), Column("P@1>0.8 from", ">14")],
        [(name, res["mean"]["precision@1"], res["mean"]["precision@5"], res["mean"]["surprisal"],
          "-" if res["first_layer_p1_above_0.8"] is None else res["first_layer_p1_above_0.8"])
         for name, res in result["lenses"].items()]))
    return report
