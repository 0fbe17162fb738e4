"""lensforge depth: prediction depth per token and its link to the model's loss.

Per token, the first layer from which the lens's top-1 equals the model's final top-1 at every
later layer (L if never); per-sequence means; Spearman correlation with the model's per-token
loss, for each lens. Writes OUT/depth.json, depth_tokens.csv and depth.png.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.depth import depth_study
from lensforge.cli.common import add_data_args, positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.cli.study_inputs import token_batches
from lensforge.viz.study_figures import plot_depth_hist


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "depth", run_depth, __doc__, out="depth", lenses="*", mismatch=True,
                     help="prediction depth per token (paper Table 2 analogue)")
    add_data_args(p, default="stdlib:heldout")
    p.set_defaults(seq_len=128)
    p.add_argument("--tokens", type=positive, default=4096, help="tokens to measure")


def run_depth(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    batches = token_batches(adapter, args.data, args.text_field, args.seq_len, args.batch_size,
                            args.tokens)
    result = depth_study(adapter, study.lenses(), batches, max_tokens=args.tokens)
    info = {**result["info"], "model": adapter.model_id, "data": args.data,
            "seq_len": args.seq_len}
    tokens = result["tokens"]
    names = list(tokens)
    report = Report()
    report.json("depth.json", {"summary": result["summary"], "info": info})
    report.csv("depth_tokens.csv", [n.replace("/", "_") for n in names],
               ([_cell(tokens[n][i]) for n in names] for i in range(len(tokens["loss"]))),
               crlf=True)
    report.figure("depth.png", plot_depth_hist, result,
                  title=f"{adapter.model_id}: prediction depth")
    report.print(Table(
        [Column("lens", "<14"), Column("mean depth", ">11.2f"), Column("ρ token", ">9"),
         Column("ρ example", ">11")],
        [(name, s["mean_depth"], _fmt(s["spearman_token"]), _fmt(s["spearman_example"]))
         for name, s in result["summary"].items()]))
    return report


def _cell(x: object) -> object:
    return f"{x:.5g}" if isinstance(x, float) or getattr(x, "dtype", None) == "float64" else x


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
