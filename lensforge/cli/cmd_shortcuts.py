"""lensforge shortcuts: per-layer Precision@1/5 and surprisal on instructions (Fig. 5b)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lensforge.analysis.shortcuts import shortcut_analysis
from lensforge.cli.cmd_transfer import add_sequence_args, sequences_from_args
from lensforge.cli.common import (
    HelpFormatter,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
)
from lensforge.lenses import load_lens
from lensforge.metrics import write_layer_metrics
from lensforge.viz.curves import plot_layer_curves


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shortcuts", help="latent linear shortcuts: per-layer P@1, P@5, surprisal",
        description="Per-layer Precision@1, Precision@5 and surprisal -log p_L(argmax q_l) of "
                    "each lens (logit lens included) on instruction data (scored on the model's "
                    "greedy reply when --new-tokens > 0, else on every position), and each "
                    "lens's mean difference to a reference lens. Writes OUT/shortcuts.json, "
                    "metrics.json/csv and shortcuts.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="*", help="lens folders, as PATH or NAME=PATH")
    p.add_argument("--reference", help="lens to compare against")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use lenses trained for another model (e.g. base lenses on instruct)")
    add_model_args(p)
    add_sequence_args(p)
    p.add_argument("--out", default="runs/shortcuts", help="output folder")
    p.set_defaults(func=run_shortcuts)


def run_shortcuts(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    lenses = {n: load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
              for n, path in parse_lens_specs(args.lenses).items()}
    seqs, described = sequences_from_args(args, adapter)
    report = shortcut_analysis(adapter, lenses, seqs, reference=args.reference)
    out = Path(args.out)
    write_layer_metrics(report.pop("full_results"), out)
    report["data"] = described
    report["model"] = adapter.model_id
    (out / "shortcuts.json").write_text(json.dumps(report, indent=2))
    png = plot_layer_curves(report["lenses"], out / "shortcuts.png",
                            metrics=("precision@1", "precision@5", "surprisal"),
                            title=f"{adapter.model_id}: latent linear shortcuts")
    print(f"data: {described}")
    print(f"{'lens':<14}{'P@1':>7}{'P@5':>7}{'surpr.':>8}{'P@1>0.8 from':>14}")
    for name, res in report["lenses"].items():
        m = res["mean"]
        first = res["first_layer_p1_above_0.8"]
        print(f"{name:<14}{m['precision@1']:>7.3f}{m['precision@5']:>7.3f}"
              f"{m['surprisal']:>8.2f}{'-' if first is None else first:>14}")
    print(f"wrote {out / 'shortcuts.json'}, {out / 'metrics.json'}, {png}")
    return 0
