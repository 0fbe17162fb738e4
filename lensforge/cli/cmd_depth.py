"""lensforge depth: prediction depth per token and its link to the model's loss."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lensforge.analysis.depth import depth_study
from lensforge.cli.common import (
    HelpFormatter,
    add_data_args,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
    positive,
)
from lensforge.data import PackedTokenStream, iter_documents
from lensforge.lenses import LogitLens, load_lens


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "depth", help="prediction depth per token (paper Table 2 analogue)",
        description="Per token, the first layer from which the lens's top-1 equals the "
                    "model's final top-1 at every later layer (L if never); per-sequence means; "
                    "Spearman correlation with the model's per-token loss, for each lens. "
                    "Writes OUT/depth.json, depth_tokens.csv and depth.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="*", help="lens folders, as PATH or NAME=PATH "
                                             "(the logit lens is always included)")
    add_model_args(p)
    add_data_args(p, default="stdlib:heldout")
    p.set_defaults(seq_len=128)
    p.add_argument("--tokens", type=positive, default=4096, help="tokens to measure")
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--out", default="runs/depth", help="output folder")
    p.set_defaults(func=run_depth)


def run_depth(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    lenses = {"logit": LogitLens.from_model(adapter)}
    for name, path in parse_lens_specs(args.lenses).items():
        lenses[name] = load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
    stream = PackedTokenStream(
        lambda: iter_documents(args.data, text_field=args.text_field, split="heldout"),
        adapter.tokenizer, args.seq_len)
    result = depth_study(adapter, lenses, stream.take_tokens(args.tokens, args.batch_size),
                         max_tokens=args.tokens)
    result["info"].update({"model": adapter.model_id, "data": args.data, "seq_len": args.seq_len})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth.json").write_text(json.dumps({"summary": result["summary"],
                                                "info": result["info"]}, indent=2))
    tokens = result["tokens"]
    names = list(tokens)
    with open(out / "depth_tokens.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([n.replace("/", "_") for n in names])
        for i in range(len(tokens["loss"])):
            writer.writerow([_cell(tokens[n][i]) for n in names])
    plot_depth_hist(result, out / "depth.png", title=f"{adapter.model_id}: prediction depth")
    print(f"{'lens':<14}{'mean depth':>11}{'ρ token':>9}{'ρ example':>11}")
    for name, s in result["summary"].items():
        print(f"{name:<14}{s['mean_depth']:>11.2f}{_fmt(s['spearman_token']):>9}"
              f"{_fmt(s['spearman_example']):>11}")
    print(f"wrote {out / 'depth.json'}, {out / 'depth_tokens.csv'}, {out / 'depth.png'}")
    return 0


def _cell(x: object) -> object:
    return f"{x:.5g}" if isinstance(x, float) or getattr(x, "dtype", None) == "float64" else x


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot_depth_hist(result: dict, path: Path, *, title: str) -> None:
    """Histogram of per-token prediction depth, one outline per lens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lensforge.viz.curves import lens_color

    n_layers = result["info"]["n_layers"]
    bins = np.arange(n_layers + 2) - 0.5
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, s in result["summary"].items():
        depth = result["tokens"][f"depth/{name}"]
        ax.hist(depth, bins=bins, histtype="step", lw=1.5, color=lens_color(name),
                label=f"{name} (mean {s['mean_depth']:.1f}, ρ={_fmt(s['spearman_token'])})")
    ax.set_xlabel(f"prediction depth (layer; {n_layers} = never settles)")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
