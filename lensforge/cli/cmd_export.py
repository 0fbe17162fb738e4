"""lensforge export: write a lens in another tool's format (tuned-lens 0.2.0).

Write the lens folder LENS as a tuned-lens 0.2.0 folder OUT (config.json + params.pt: one
nn.Linear translator per layer, the layout tuned-lens saves and loads). A LoRA (low-rank)
lens becomes its dense equivalent: each layer's A_l B_l as a full H x H weight, the same map
up to float rounding, but no longer low-rank (and H/(2r) times larger). OUT must not exist,
or be an empty folder. No model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lensforge.cli.common import check_new_out
from lensforge.cli.study import command_parser
from lensforge.errors import CheckpointError, ConfigError
from lensforge.lenses import LowRankLens, export_tuned_lens, load_lens

FORMATS = ("tuned-lens",)


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "export", run_export, __doc__,
                       help="write a lens in tuned-lens format")
    p.add_argument("lens", metavar="LENS",
                   help="a lens folder written by lensforge (train, import)")
    p.add_argument("--format", choices=FORMATS, default="tuned-lens", help="output format")
    p.add_argument("out_dir", metavar="OUT", help="the folder to write")


def run_export(args: argparse.Namespace) -> int:
    out = check_new_out(args.out_dir)
    source = Path(args.lens)
    if not source.is_dir():
        raise CheckpointError(f"no lens folder at {source}")
    lens = load_lens(source)  # untrusted input: every problem is a one-line CheckpointError
    if lens.lens_type == "logit":
        raise ConfigError(f"{source} is the logit lens: it has no translators to export "
                          "(tuned-lens's logit lens needs no file)")
    export_tuned_lens(lens, out)
    cfg = lens.config
    dense = (f"; the LoRA lens (rank {cfg.rank}) was written as its dense equivalent A·B"
             if isinstance(lens, LowRankLens) else "")
    print(f"wrote {out} (tuned-lens 0.2.0: {cfg.n_layers} layers, d_model {cfg.hidden_size}"
          f"{dense})")
    return 0
