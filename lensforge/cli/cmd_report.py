"""lensforge report: one self-contained HTML report for a run folder.

Per-layer curves of every metric for every lens, the training loss, prediction-trajectory
grids of held-out samples (loads the run's model; skip with --no-samples), configuration and
timings, in one HTML file that opens without network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lensforge.cli.common import positive
from lensforge.cli.study import command_parser


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "report", run_report, __doc__,
                       help="self-contained HTML report of a run folder")
    p.add_argument("run_dir", help="folder written by `lensforge run` or `lensforge eval`")
    p.add_argument("--out", help="output file")
    p.add_argument("--no-samples", action="store_true",
                   help="no trajectory grids (does not load the model)")
    p.add_argument("--samples", type=positive, default=3, help="held-out samples shown")
    p.add_argument("--sample-tokens", type=positive, default=40, help="tokens per sample")
    p.set_defaults(out_kind="file")


def run_report(args: argparse.Namespace) -> int:
    from lensforge.viz.report import write_run_report

    path = write_run_report(Path(args.run_dir), out=Path(args.out) if args.out else None,
                            samples=0 if args.no_samples else args.samples,
                            sample_tokens=args.sample_tokens)
    print(f"report: {path}")
    return 0
