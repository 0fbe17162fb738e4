"""lensforge spectrum: SVD metrics of trained lens translators (paper Fig. 1).

Per-layer and mean effective rank (Roy & Vetterli), energy share of the top 50% of singular
values, components for 90% energy and participation ratio of each lens's translator (tuned:
W_l; LoRA: A_l B_l). Needs no model. Writes OUT/spectrum.json, spectrum.csv and spectrum.png.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.spectrum import lens_spectrum, write_spectrum
from lensforge.cli.common import parse_lens_specs
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.errors import ConfigError
from lensforge.lenses import load_lens
from lensforge.viz.paper_figures import plot_spectrum


def register(sub: argparse._SubParsersAction) -> None:
    study_parser(sub, "spectrum", run_spectrum, __doc__, out="spectrum", lenses="+", model=False,
                 lens_help="lens folders, as PATH or NAME=PATH",
                 help="effective rank / energy / participation ratio of lens translators")


def run_spectrum(study: Study) -> Report:
    results = {}
    for name, path in parse_lens_specs(study.args.lenses).items():
        lens = load_lens(path)  # no model: a translator's spectrum is the lens's own
        if lens.lens_type == "logit":
            raise ConfigError(f"'{name}' is a logit lens: it has no translator to analyse")
        results[name] = lens_spectrum(lens)
    report = Report()
    report.file("spectrum.json", lambda path: write_spectrum(results, path.parent),
                listed=("spectrum.json", "spectrum.csv"))
    report.figure("spectrum.png", plot_spectrum, results)
    report.print(Table(
        [Column("lens", "<14"), Column("H", ">6"), Column("eff.rank", ">10.1f"),
         Column("/H", ">8.3f"), Column("top50%", ">8.3f"), Column("c90", ">7.1f"),
         Column("PR", ">9.1f"), Column("/H", ">7.3f")],
        [(name, res["hidden_size"], res["mean"]["effective_rank"], res["effective_rank_over_h"],
          res["mean"]["energy_top_half"], res["mean"]["components_90"],
          res["mean"]["participation_ratio"], res["participation_ratio_over_h"])
         for name, res in results.items()]))
    return report
