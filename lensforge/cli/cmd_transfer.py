"""lensforge transfer: lenses trained on model A, scored on sibling B (paper Fig. 5a)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lensforge.analysis.transfer import EvalSequence, load_sequences, transfer_eval
from lensforge.cli.common import (
    HelpFormatter,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
    positive,
)
from lensforge.lenses import load_lens
from lensforge.metrics import write_layer_metrics
from lensforge.viz.curves import plot_layer_curves


def add_sequence_args(p: argparse.ArgumentParser) -> None:
    """Evaluation data shared by transfer, shortcuts and early-exit."""
    g = p.add_argument_group("data")
    g.add_argument("--instructions", default="alpaca",
                   help="'alpaca' (AlpacaEval's 805, cached or fetched from PyPI), 'builtin', "
                        "or a path to AlpacaEval outputs.json; formatted with the chat template")
    g.add_argument("--data", help="use held-out text from this source instead of instructions")
    g.add_argument("--text-field", default="text", help="jsonl/parquet field")
    g.add_argument("--n-instructions", type=positive, default=32, help="instructions to use")
    g.add_argument("--new-tokens", type=int, default=0,
                   help="append the model's greedy reply of this many tokens to each prompt")
    g.add_argument("--seq-len", type=positive, default=512, help="max tokens per sequence")
    g.add_argument("--tokens", type=positive, default=8192, help="tokens of --data text")


def sequences_from_args(args: argparse.Namespace, adapter: object) -> tuple[list[EvalSequence], str]:
    return load_sequences(adapter, data=args.data,
                          instructions=None if args.data else args.instructions,
                          n_instructions=args.n_instructions, new_tokens=args.new_tokens,
                          seq_len=args.seq_len, max_tokens=args.tokens,
                          text_field=args.text_field)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transfer", help="apply lenses trained on model A to a sibling model B",
        description="Evaluates lenses trained on model A (positional) on sibling model B "
                    "(--model; same L and H) next to lenses trained on B (--native), and "
                    "reports per-layer KL and RAF against a native reference (scored on the greedy "
                    "reply when --new-tokens > 0, else on every position). Writes "
                    "OUT/metrics.json/csv, transfer.json and transfer_kl.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="+", help="lenses trained on model A, as PATH or NAME=PATH")
    p.add_argument("--native", nargs="*", default=[],
                   help="lenses trained on model B itself, as PATH or NAME=PATH")
    p.add_argument("--reference", help="native lens to compute RAF against")
    add_model_args(p)
    add_sequence_args(p)
    p.add_argument("--out", default="runs/transfer", help="output folder")
    p.set_defaults(func=run_transfer)


def run_transfer(args: argparse.Namespace) -> int:
    adapter = load_model_from_args(args)
    transferred = {n: load_lens(path, adapter, allow_mismatch=True)
                   for n, path in parse_lens_specs(args.lenses).items()}
    native = {n: load_lens(path, adapter) for n, path in parse_lens_specs(args.native).items()}
    seqs, described = sequences_from_args(args, adapter)
    report = transfer_eval(adapter, transferred, native, seqs, reference=args.reference)
    out = Path(args.out)
    write_layer_metrics(report["results"], out)
    (out / "transfer.json").write_text(json.dumps({
        "model_b": adapter.model_id, "data": described, "reference": report["reference"],
        "raf": report["raf"],
        "transferred_from": {n: lens.config.model_id for n, lens in transferred.items()},
        "mean_kl": {n: r["mean"]["kl"] for n, r in report["results"].items()},
    }, indent=2))
    png = plot_layer_curves(report["results"], out / "transfer_kl.png",
                            metrics=("kl", "precision@1"),
                            title=f"lenses transferred to {adapter.model_id}")
    print(f"data: {described}")
    print(f"{'lens':<22}{'mean KL':>9}{'RAF':>8}   (RAF vs {report['reference']})")
    for name, res in report["results"].items():
        raf = report["raf"].get(name)
        print(f"{name:<22}{res['mean']['kl']:>9.3f}{'' if raf is None else f'{raf:.3f}':>8}")
    print(f"wrote {out / 'transfer.json'}, {out / 'metrics.json'}, {png}")
    return 0
