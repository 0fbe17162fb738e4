"""lensforge early-exit: offline CALM exit rate / precision of lenses (paper Fig. 6)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lensforge.analysis.early_exit_eval import collect_exit_records, exit_curve
from lensforge.cli.cmd_transfer import add_sequence_args, sequences_from_args
from lensforge.cli.common import (
    HelpFormatter,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
    positive,
)
from lensforge.errors import ConfigError
from lensforge.lenses import LogitLens, load_lens
from lensforge.viz.paper_figures import plot_early_exit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "early-exit", help="offline CALM early-exit analysis (exit rate / precision vs lambda)",
        description="Applies the CALM rule (exit at the first layer whose lens top1-top2 "
                    "probability gap exceeds 0.9*lambda + 0.1*exp(-4i/N)) to every token, for "
                    "each lens, as lambda sweeps 0..1: exit rate, exit precision (agreement "
                    "with the full model's token) and the fraction of layers skipped. Scores "
                    "recorded lens outputs; for real layer-skipping generation see "
                    "`lensforge generate`. Writes OUT/early_exit.json, early_exit.csv and "
                    "early_exit.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="*", help="lens folders, as PATH or NAME=PATH "
                                             "(the logit lens is always added)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use lenses trained for another model (e.g. base lenses on instruct)")
    p.add_argument("--lambdas", type=positive, default=21,
                   help="number of evenly spaced lambda values in [0, 1]")
    p.add_argument("--min-layer", type=int, default=1,
                   help="earliest layer allowed to exit (0 = the embeddings)")
    add_model_args(p)
    add_sequence_args(p)
    p.add_argument("--out", default="runs/early_exit", help="output folder")
    p.set_defaults(func=run_early_exit)


def run_early_exit(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    if not 0 <= args.min_layer < adapter.n_layers:
        raise ConfigError(f"--min-layer must be in 0..{adapter.n_layers - 1}")
    lenses = {"logit": LogitLens.from_model(adapter)}
    lenses.update({n: load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
                   for n, path in parse_lens_specs(args.lenses).items()})
    seqs, described = sequences_from_args(args, adapter)
    n = args.lambdas
    lambdas = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    curves, avg_len = {}, None
    for name, lens in lenses.items():
        records = collect_exit_records(adapter, lens, seqs)
        avg_len = records.avg_len
        curves[name] = exit_curve(records, lambdas, args.min_layer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "early_exit.json").write_text(json.dumps(_nan_to_none({
        "model": adapter.model_id, "n_layers": adapter.n_layers, "data": described,
        "avg_input_len": avg_len, "min_layer": args.min_layer, "curves": curves,
    }), indent=2))
    with (out / "early_exit.csv").open("w", newline="") as f:
        fields = ("lens", "lambda", "exit_rate", "exit_precision", "agreement",
                  "layers_skipped", "mean_exit_layer", "n_tokens")
        w = csv.DictWriter(f, fields, lineterminator="\n")
        w.writeheader()
        for name, curve in curves.items():
            for row in curve:
                w.writerow({"lens": name, **row})
    png = plot_early_exit(curves, out / "early_exit.png",
                          title=f"{adapter.model_id}: CALM early exit (N={avg_len:.0f})")
    print(f"data: {described}; N = {avg_len:.1f}")
    print(f"{'lens':<14}{'lambda':>7}{'exit rate':>10}{'precision':>10}{'skipped':>9}")
    for name, curve in curves.items():
        for row in curve[:: max(1, len(curve) // 5)]:
            prec = row["exit_precision"]
            print(f"{name:<14}{row['lambda']:>7.2f}{row['exit_rate']:>10.3f}"
                  f"{prec:>10.3f}{row['layers_skipped']:>9.3f}")
    print(f"wrote {out / 'early_exit.json'}, {out / 'early_exit.csv'}, {png}")
    return 0


def _nan_to_none(x: object) -> object:
    """Strict JSON: NaN (e.g. exit precision when nothing exits) becomes null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x
