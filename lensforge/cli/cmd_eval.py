"""lensforge eval: per-layer metrics of lenses on held-out text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lensforge.cli.common import (
    HelpFormatter,
    add_data_args,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
    positive,
    print_table,
)
from lensforge.data import PackedTokenStream, iter_documents
from lensforge.data.sources import check_source
from lensforge.errors import CheckpointError
from lensforge.evaluation import evaluate, raf_table
from lensforge.lenses import load_lens
from lensforge.metrics import write_layer_metrics
from lensforge.viz.curves import plot_layer_curves


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate lenses per layer",
        description="KL to the final layer, cross-entropy, entropy, Precision@1/5 and surprisal "
                    "per layer for each lens (logit lens always included); RAF against a "
                    "reference. Writes OUT/metrics.json, metrics.csv and layers.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("lenses", nargs="*", help="lens folders, as PATH or NAME=PATH")
    add_model_args(p)
    add_data_args(p, default="stdlib:heldout")
    p.add_argument("--tokens", type=positive, default=16_384, help="evaluation tokens")
    p.add_argument("--reference", help="lens name to compute RAF against")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use lenses trained for another model (transfer)")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.set_defaults(func=run_eval)


def evaluate_to_folder(adapter, lenses, data: str, text_field: str, seq_len: int,
                       batch_size: int, tokens: int, out: Path, reference: str | None) -> dict:
    """Evaluate, write metrics.json/csv and layers.png into `out`; returns results."""
    stream = PackedTokenStream(lambda: iter_documents(data, text_field=text_field,
                                                      split="heldout"),
                               adapter.tokenizer, seq_len)
    results = evaluate(adapter, lenses, stream.batches(batch_size), max_tokens=tokens)
    if reference is None and "tuned" in results:
        reference = "tuned"
    raf = raf_table(results, reference) if reference else {}
    out.mkdir(parents=True, exist_ok=True)
    write_layer_metrics(results, out)
    (out / "raf.json").write_text(json.dumps({"reference": reference, "raf": raf}, indent=2))
    plot_layer_curves(results, out / "layers.png", title=f"{adapter.model_id}: lenses per layer")
    print_table(results, raf=raf)
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.csv'}, {out / 'layers.png'}")
    return results


def run_eval(args: argparse.Namespace) -> int:
    specs = parse_lens_specs(args.lenses)
    for name, path in specs.items():  # fail before the model loads
        if not path.exists() and not (name == "logit" and path.name == "logit"):
            raise CheckpointError(f"lens folder {path} does not exist")
    check_source(args.data, text_field=args.text_field, split="heldout")
    adapter = load_model_from_args(args)
    lenses = {name: load_lens(path, adapter, allow_mismatch=args.allow_mismatch)
              for name, path in specs.items()}
    evaluate_to_folder(adapter, lenses, args.data, args.text_field, args.seq_len,
                       args.batch_size, args.tokens, Path(args.out), args.reference)
    return 0
