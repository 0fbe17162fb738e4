"""lensforge memory: training memory of full-rank vs LoRA lenses (paper Fig. 4)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lensforge.analysis.memory import (
    OPTIMIZER_STATES,
    PUBLISHED_CONFIGS,
    config_dims,
    measure_training_memory,
    memory_table,
    reduction_percent,
)
from lensforge.cli.common import HelpFormatter, add_model_args, load_model_from_args, positive
from lensforge.errors import ConfigError
from lensforge.viz.paper_figures import plot_memory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory", help="bytes of params/grads/optimizer state: tuned vs LoRA lens",
        description="Computes, from hidden size and layer count alone, the bytes of "
                    "parameters, gradients and optimizer state (AdamW: 2 fp32 moments, SGD: 1) "
                    "of a tuned lens and a LoRA-Lens, for published configs and any "
                    "config.json; with --measure also trains each lens type one step on "
                    "--model and measures it. Writes OUT/memory.json, memory.csv, memory.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", nargs="*", default=[], metavar="[NAME=]PATH",
                   help="Hugging Face config.json files (or model folders) to add")
    p.add_argument("--no-published", action="store_true",
                   help="leave out the built-in table of published configs")
    p.add_argument("-k", type=positive, default=32, help="LoRA rank divisor: r = floor(H/k)")
    p.add_argument("--optimizer", nargs="+", default=["adamw", "sgd"],
                   choices=sorted(OPTIMIZER_STATES))
    p.add_argument("--measure", action="store_true",
                   help="also measure one training step of each lens type on --model")
    p.add_argument("--measure-tokens", type=positive, default=512,
                   help="tokens in the measured training step")
    add_model_args(p)
    p.add_argument("--out", default="runs/memory", help="output folder")
    p.set_defaults(func=run_memory)


def _configs(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    models = {} if args.no_published else dict(PUBLISHED_CONFIGS)
    for spec in args.config:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        models[name or Path(path).resolve().name.removesuffix(".json")] = config_dims(path)
    if not models:
        raise ConfigError("no configs: drop --no-published or add --config files")
    return models


def _measure(args: argparse.Namespace) -> tuple[str, tuple[int, int], list[dict]]:
    adapter = load_model_from_args(args)
    ids = adapter.tokenizer("The quick brown fox jumps over the lazy dog. " * 400,
                            return_tensors="pt")["input_ids"][:, : args.measure_tokens]
    rows = []
    for opt in args.optimizer:
        for lens_type in ("tuned", "lowrank"):
            rows.append(measure_training_memory(adapter, ids, lens_type, k=args.k,
                                                optimizer=opt))
    return adapter.model_id, (adapter.hidden_size, adapter.n_layers), rows


def run_memory(args: argparse.Namespace) -> int:
    models = _configs(args)
    measured_model, measured = None, []
    if args.measure:
        model_id, dims, measured = _measure(args)
        measured_model = f"{Path(model_id).name} (measured)"
        models[measured_model] = dims  # its computed row, to set beside the measurement
    table = memory_table(models, k=args.k, optimizers=tuple(args.optimizer))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(
        {"computed": table, "measured": measured, "measured_model": measured_model}, indent=2))
    with (out / "memory.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("source", "model", "optimizer", "lens_type", "rank", "parameters",
                    "param_bytes", "grad_bytes", "optimizer_bytes", "total_bytes",
                    "peak_delta_bytes"))
        for r in table:
            for kind in ("tuned", "lowrank"):
                m = r[kind]
                w.writerow(("computed", r["model"], r["optimizer"], kind, m["rank"],
                            m["parameters"], m["param_bytes"], m["grad_bytes"],
                            m["optimizer_bytes"], m["total_bytes"], ""))
        for m in measured:
            w.writerow(("measured", measured_model, m["optimizer"], m["lens_type"], m["rank"],
                        m["parameters"], m["param_bytes"], m["grad_bytes"],
                        m["optimizer_bytes"], m["state_bytes"], m["peak_delta_bytes"] or ""))
    first = args.optimizer[0]
    rows = [r for r in table if r["optimizer"] == first]
    png = plot_memory(rows, out / "memory.png",
                      measured=[m for m in measured if m["optimizer"] == first],
                      measured_model=measured_model,
                      title=f"lens training memory ({first}, fp32)")
    print(f"{'model':<16}{'opt':>6}{'tuned MiB':>12}{'LoRA MiB':>10}{'reduction':>11}")
    for r in table:
        print(f"{r['model']:<16}{r['optimizer']:>6}{r['tuned']['total_bytes'] / 2**20:>12.1f}"
              f"{r['lowrank']['total_bytes'] / 2**20:>10.2f}"
              f"{r['reduction_percent']['total_bytes']:>10.1f}%")
    for opt in args.optimizer:
        pair = {m["lens_type"]: m for m in measured if m["optimizer"] == opt}
        if len(pair) == 2:
            print(f"measured on {measured_model} ({opt}): state "
                  f"{pair['tuned']['state_bytes']:,} vs {pair['lowrank']['state_bytes']:,} B "
                  f"({reduction_percent(pair['tuned']['state_bytes'], pair['lowrank']['state_bytes']):.1f}% less); "
                  f"peak increase {pair['tuned']['peak_delta_bytes']} vs "
                  f"{pair['lowrank']['peak_delta_bytes']} B")
    print(f"wrote {out / 'memory.json'}, {out / 'memory.csv'}, {png}")
    return 0

