"""lensforge early-exit: offline CALM exit rate / precision of lenses (paper Fig. 6).

Applies the CALM rule (exit at the first layer whose lens top1-top2 probability gap exceeds
0.9*lambda + 0.1*exp(-4i/N)) to every token, for each lens, as lambda sweeps 0..1: exit rate,
exit precision (agreement with the full model's token) and the fraction of layers skipped.
Scores recorded lens outputs; for real layer-skipping generation see `lensforge generate`.
Writes OUT/early_exit.json, early_exit.csv and early_exit.png.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.early_exit_eval import ExitStats, collect_exit_records, exit_curve
from lensforge.cli.common import positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.cli.study_inputs import add_sequence_args, sequences_from_args
from lensforge.errors import ConfigError
from lensforge.viz.paper_figures import plot_early_exit

CSV_FIELDS = ("lens", "lambda", "exit_rate", "exit_precision", "agreement", "layers_skipped",
              "mean_exit_layer", "n_tokens")


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "early-exit", run_early_exit, __doc__, out="early_exit", lenses="*",
                     mismatch=True,
                     lens_help="lens folders, as PATH or NAME=PATH (the logit lens is always added)",
                     help="offline CALM early-exit analysis (exit rate / precision vs lambda)")
    p.add_argument("--lambdas", type=positive, default=21,
                   help="number of evenly spaced lambda values in [0, 1]")
    p.add_argument("--min-layer", type=int, default=1,
                   help="earliest layer allowed to exit (0 = the embeddings)")
    add_sequence_args(p)


def run_early_exit(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    if not 0 <= args.min_layer < adapter.n_layers:
        raise ConfigError(f"--min-layer must be in 0..{adapter.n_layers - 1}")
    lenses = study.lenses()
    seqs, described = sequences_from_args(args, adapter)
    n = args.lambdas
    lambdas = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    curves: dict[str, list[ExitStats]] = {}
    avg_len: float | None = None
    for name, lens in lenses.items():
        records = collect_exit_records(adapter, lens, seqs)
        avg_len = records.avg_len
        curves[name] = exit_curve(records, lambdas, args.min_layer)
    report = Report()
    report.json("early_exit.json", {
        "model": adapter.model_id, "n_layers": adapter.n_layers, "data": described,
        "avg_input_len": avg_len, "min_layer": args.min_layer, "curves": curves,
    }, nan_as_null=True)
    report.records("early_exit.csv", [{"lens": name, **row} for name, curve in curves.items()
                                      for row in curve], CSV_FIELDS)
    report.figure("early_exit.png", plot_early_exit, curves,
                  title=f"{adapter.model_id}: CALM early exit (N={avg_len:.0f})")
    report.print(f"data: {described}; N = {avg_len:.1f}", Table(
        [Column("lens", "<14"), Column("lambda", ">7.2f"), Column("exit rate", ">10.3f"),
         Column("precision", ">10.3f"), Column("skipped", ">9.3f")],
        [(name, row["lambda"], row["exit_rate"], row["exit_precision"], row["layers_skipped"])
         for name, curve in curves.items() for row in curve[:: max(1, len(curve) // 5)]]))
    return report
