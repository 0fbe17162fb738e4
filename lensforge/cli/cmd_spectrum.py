"""lensforge spectrum: SVD metrics of trained lens translators (paper Fig. 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lensforge.analysis.spectrum import lens_spectrum, write_spectrum
from lensforge.cli.common import HelpFormatter, parse_lens_specs
from lensforge.errors import ConfigError
from lensforge.lenses import load_lens
from lensforge.viz.paper_figures import plot_spectrum


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spectrum", help="effective rank / energy / participation ratio of lens translators",
        description="Per-layer and mean effective rank (Roy & Vetterli), energy share of the "
                    "top 50%% of singular values, components for 90%% energy and participation "
                    "ratio of each lens's translator (tuned: W_l; LoRA: A_l B_l). Needs no "
                    "model. Writes OUT/spectrum.json, spectrum.csv and spectrum.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="+", help="lens folders, as PATH or NAME=PATH")
    p.add_argument("--out", default="runs/spectrum", help="output folder")
    p.set_defaults(func=run_spectrum)


def run_spectrum(args: argparse.Namespace) -> int:
    results = {}
    for name, path in parse_lens_specs(args.lenses).items():
        lens = load_lens(path)
        if lens.lens_type == "logit":
            raise ConfigError(f"'{name}' is a logit lens: it has no translator to analyse")
        results[name] = lens_spectrum(lens)
    out = Path(args.out)
    json_path, csv_path = write_spectrum(results, out)
    png = plot_spectrum(results, out / "spectrum.png")
    print(f"{'lens':<14}{'H':>6}{'eff.rank':>10}{'/H':>8}{'top50%':>8}{'c90':>7}{'PR':>9}{'/H':>7}")
    for name, res in results.items():
        m = res["mean"]
        print(f"{name:<14}{res['hidden_size']:>6}{m['effective_rank']:>10.1f}"
              f"{res['effective_rank_over_h']:>8.3f}{m['energy_top_half']:>8.3f}"
              f"{m['components_90']:>7.1f}{m['participation_ratio']:>9.1f}"
              f"{res['participation_ratio_over_h']:>7.3f}")
    print(f"wrote {json_path}, {csv_path}, {png}")
    return 0
