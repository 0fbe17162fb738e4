"""lensforge eval: per-layer metrics of lenses on held-out text.

KL to the final layer, cross-entropy, entropy, Precision@1/5 and surprisal per layer for each
lens (logit lens always included); RAF against a reference. Writes OUT/metrics.json,
metrics.csv and layers.png.
"""

from __future__ import annotations

import argparse

from lensforge.cli.common import add_data_args, positive
from lensforge.cli.study import Report, Study, evaluate_to_folder, evaluation_report, study_parser
from lensforge.data.sources import check_source

__all__ = ["evaluate_to_folder", "register"]  # evaluate_to_folder: lives in study.py


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "eval", run_eval, __doc__, out="eval", lenses="*", check=_check,
                     mismatch="use lenses trained for another model (transfer)",
                     lens_help="lens folders, as PATH or NAME=PATH",
                     help="evaluate lenses per layer")
    add_data_args(p, default="stdlib:heldout")
    p.add_argument("--tokens", type=positive, default=16_384, help="evaluation tokens")
    p.add_argument("--reference", help="lens name to compute RAF against")


def _check(args: argparse.Namespace) -> None:
    check_source(args.data, text_field=args.text_field, split="heldout")


def run_eval(study: Study) -> Report:
    args = study.args
    return evaluation_report(study.adapter, study.lenses(), args.data, args.text_field, args.seq_len,
                             args.batch_size, args.tokens, args.reference)[1]
