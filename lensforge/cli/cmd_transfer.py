"""lensforge transfer: lenses trained on model A, scored on sibling B (paper Fig. 5a).

Evaluates lenses trained on model A (positional) on sibling model B (--model; same L and H)
next to lenses trained on B (--native), and reports per-layer KL and RAF against a native
reference (scored on the greedy reply when --new-tokens > 0, else on every position). Writes
OUT/metrics.json/csv, transfer.json and transfer_kl.png.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.transfer import transfer_eval
from lensforge.cli.common import parse_lens_specs
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.cli.study_inputs import add_sequence_args, sequences_from_args
from lensforge.viz.curves import plot_layer_curves


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "transfer", run_transfer, __doc__, out="transfer", lenses="+",
                     lens_help="lenses trained on model A, as PATH or NAME=PATH",
                     lens_args=("lenses", "native"),
                     help="apply lenses trained on model A to a sibling model B")
    p.add_argument("--native", nargs="*", default=[],
                   help="lenses trained on model B itself, as PATH or NAME=PATH")
    p.add_argument("--reference", help="native lens to compute RAF against")
    add_sequence_args(p)


def run_transfer(study: Study) -> Report:
    args, adapter = study.args, study.adapter
    transferred = study.lenses(logit=False, allow_mismatch=True)  # trained for model A
    native = study.lenses(parse_lens_specs(args.native), logit=False, allow_mismatch=False)
    seqs, described = sequences_from_args(args, adapter)
    result = transfer_eval(adapter, transferred, native, seqs, reference=args.reference)
    report = Report()
    report.json("transfer.json", {
        "model_b": adapter.model_id, "data": described, "reference": result["reference"],
        "raf": result["raf"],
        "transferred_from": {n: lens.config.model_id for n, lens in transferred.items()},
        "mean_kl": {n: r["mean"]["kl"] for n, r in result["results"].items()},
    })
    report.layer_metrics(result["results"])
    report.figure("transfer_kl.png", plot_layer_curves, result["results"],
                  metrics=("kl", "precision@1"), title=f"lenses transferred to {adapter.model_id}")
    report.print(f"data: {described}", Table(
        [Column("lens", "<22"), Column("mean KL", ">9.3f"), Column("RAF", ">8"),
         Column(f"   (RAF vs {result['reference']})")],
        [(name, res["mean"]["kl"], "" if result["raf"].get(name) is None
          else f"{result['raf'][name]:.3f}", "") for name, res in result["results"].items()]))
    return report
