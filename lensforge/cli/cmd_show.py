"""lensforge show: the prediction trajectory of a text as interactive HTML (and a PNG).

Top-1 token of every layer at every position, colored by a statistic, for the logit lens and
any trained lenses. Writes a self-contained HTML page (hover for the top-5, switch
lens/statistic, compare two lenses side by side) and optionally a PNG of the same grid.
"""

from __future__ import annotations

import argparse

from lensforge.analysis.trajectory import STATS, PredictionTrajectory
from lensforge.cli.common import (
    add_model_args,
    check_out_path,
    load_model_from_args,
    parse_lens_specs,
    positive,
)
from lensforge.cli.study import command_parser
from lensforge.data.sources import decode_text, read_text_file
from lensforge.errors import ConfigError, DataError
from lensforge.lenses import LogitLens, load_lens


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "show", run_show, __doc__,
                       help="prediction trajectory of a text: interactive HTML grid and PNG")
    p.add_argument("text", nargs="?", help="the text (or use --file)")
    p.add_argument("--file", help="read the text from this file ('-' = stdin)")
    p.add_argument("--lens", action="append", default=[], metavar="NAME=PATH",
                   help="a trained lens folder (repeatable); the logit lens is always shown")
    add_model_args(p)
    p.add_argument("--out", default="trajectory.html", help="HTML output")
    p.add_argument("--png", help="also write the grid as a PNG here")
    p.add_argument("--json", help="also write the trajectory data as JSON here")
    p.add_argument("--stat", default="entropy", choices=list(STATS),
                   help="statistic the cells are colored by (switchable in the page)")
    p.add_argument("--compare", help="lens shown side by side in the page")
    p.add_argument("--top-k", type=positive, default=5, help="tokens kept per cell")
    p.add_argument("--max-tokens", type=positive, default=256, help="clip the text to this")
    p.add_argument("--window", type=positive, help="context per forward pass for long texts")
    p.add_argument("--stride", type=positive, help="new positions per window")
    p.add_argument("--png-positions", type=positive, default=48,
                   help="columns in the PNG (from --png-start)")
    p.add_argument("--png-start", type=int, default=0, help="first position in the PNG")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use lenses trained for another model (transfer)")
    p.set_defaults(out_kind="file")


# --max-tokens clips the text anyway; a bound keeps a huge file from filling memory.
MAX_FILE_BYTES = 1 << 24


def read_text(args: argparse.Namespace) -> str:
    if args.file and args.text:
        raise ConfigError("give the text or --file, not both")
    if args.file == "-":
        import sys

        data = sys.stdin.buffer.read(MAX_FILE_BYTES)
        text = decode_text(data, "standard input", final=len(data) < MAX_FILE_BYTES)
    elif args.file:
        # the text-encoding policy of every reader: UTF-8, a few bad bytes replaced
        text = read_text_file(args.file, max_bytes=MAX_FILE_BYTES)
    else:
        text = args.text
    if not text or not text.strip():
        raise DataError("no text to show: pass TEXT or --file")
    return text


def run_show(args: argparse.Namespace) -> int:
    text = read_text(args)
    for option in ("png", "json"):
        if getattr(args, option):
            check_out_path(getattr(args, option), kind="file", option=f"--{option}")
    specs = parse_lens_specs(args.lens)
    if "logit" in specs:
        raise ConfigError("'logit' is built in; give your lens another name")
    adapter = load_model_from_args(args)
    lenses = {"logit": LogitLens.from_model(adapter)}
    for name, path in specs.items():
        lenses[name] = load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
    traj = PredictionTrajectory.from_text(adapter, text, lenses, top_k=args.top_k,
                                          max_tokens=args.max_tokens, window=args.window,
                                          stride=args.stride)
    main_lens = list(lenses)[-1]
    compare = args.compare if args.compare else ("logit" if main_lens != "logit" else None)
    from lensforge.viz.html import write_trajectory_html

    page = write_trajectory_html(traj, args.out, stat=args.stat, lens=main_lens, compare=compare)
    print(f"wrote {page} ({traj.n_positions} tokens × {traj.n_rows} rows, "
          f"lenses: {', '.join(lenses)})")
    if args.png:
        from lensforge.viz.grid_png import plot_trajectory_grid

        png = plot_trajectory_grid(traj, args.png, stat=args.stat, start=args.png_start,
                                   max_positions=args.png_positions)
        print(f"wrote {png}")
    if args.json:
        print(f"wrote {traj.save_json(args.json)}")
    return 0
