"""lensforge memory: training memory of full-rank vs LoRA lenses (paper Fig. 4).

Computes, from hidden size and layer count alone, the bytes of parameters, gradients and
optimizer state (AdamW: 2 fp32 moments, SGD: 1) of a tuned lens and a LoRA-Lens, for published
configs and any config.json; with --measure also trains each lens type one step on --model and
measures it. Writes OUT/memory.json, memory.csv, memory.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lensforge.analysis.memory import (
    OPTIMIZER_STATES,
    PUBLISHED_CONFIGS,
    MeasuredMemory,
    MemoryRow,
    config_dims,
    measure_training_memory,
    memory_table,
    reduction_percent,
)
from lensforge.cli.common import positive
from lensforge.cli.study import Column, Report, Study, Table, study_parser
from lensforge.errors import ConfigError
from lensforge.viz.paper_figures import plot_memory

CSV_HEADER = ("source", "model", "optimizer", "lens_type", "rank", "parameters", "param_bytes",
              "grad_bytes", "optimizer_bytes", "total_bytes", "peak_delta_bytes")


def register(sub: argparse._SubParsersAction) -> None:
    p = study_parser(sub, "memory", run_memory, __doc__, out="memory",
                     help="bytes of params/grads/optimizer state: tuned vs LoRA lens")
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


def _configs(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    models = {} if args.no_published else dict(PUBLISHED_CONFIGS)
    for spec in args.config:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        models[name or Path(path).resolve().name.removesuffix(".json")] = config_dims(path)
    if not models:
        raise ConfigError("no configs: drop --no-published or add --config files")
    return models


def _measure(study: Study) -> list[MeasuredMemory]:
    args, adapter = study.args, study.adapter
    ids = adapter.tokenizer("The quick brown fox jumps over the lazy dog. " * 400,
                            return_tensors="pt")["input_ids"][:, : args.measure_tokens]
    return [measure_training_memory(adapter, ids, lens_type, k=args.k, optimizer=opt)
            for opt in args.optimizer for lens_type in ("tuned", "lowrank")]


def _csv_rows(table: list[MemoryRow], measured: list[MeasuredMemory],
              measured_model: str | None) -> list[tuple]:
    rows: list[tuple] = []
    for r in table:
        for kind, m in (("tuned", r["tuned"]), ("lowrank", r["lowrank"])):
            rows.append(("computed", r["model"], r["optimizer"], kind, m["rank"], m["parameters"],
                         m["param_bytes"], m["grad_bytes"], m["optimizer_bytes"],
                         m["total_bytes"], ""))
    for mm in measured:
        rows.append(("measured", measured_model, mm["optimizer"], mm["lens_type"], mm["rank"],
                     mm["parameters"], mm["param_bytes"], mm["grad_bytes"], mm["optimizer_bytes"],
                     mm["state_bytes"], mm["peak_delta_bytes"] or ""))
    return rows


def _measured_lines(optimizers: list[str], measured: list[MeasuredMemory],
                    model: str | None) -> list[str]:
    lines = []
    for opt in optimizers:
        pair = {m["lens_type"]: m for m in measured if m["optimizer"] == opt}
        if len(pair) == 2:
            tuned, lora = pair["tuned"], pair["lowrank"]
            lines.append(f"measured on {model} ({opt}): state "
                         f"{tuned['state_bytes']:,} vs {lora['state_bytes']:,} B "
                         f"({reduction_percent(tuned['state_bytes'], lora['state_bytes']):.1f}% "
                         f"less); peak increase {tuned['peak_delta_bytes']} vs "
                         f"{lora['peak_delta_bytes']} B")
    return lines


def run_memory(study: Study) -> Report:
    args = study.args
    models = _configs(args)  # before the model loads (--measure)
    measured_model: str | None = None
    measured: list[MeasuredMemory] = []
    if args.measure:
        measured = _measure(study)
        measured_model = f"{Path(study.adapter.model_id).name} (measured)"
        # its computed row, to set beside the measurement
        models[measured_model] = (study.adapter.hidden_size, study.adapter.n_layers)
    table = memory_table(models, k=args.k, optimizers=tuple(args.optimizer))
    first = args.optimizer[0]
    report = Report()
    report.json("memory.json",
                {"computed": table, "measured": measured, "measured_model": measured_model})
    report.csv("memory.csv", CSV_HEADER, _csv_rows(table, measured, measured_model))
    report.figure("memory.png", plot_memory, [r for r in table if r["optimizer"] == first],
                  measured=[m for m in measured if m["optimizer"] == first],
                  measured_model=measured_model, title=f"lens training memory ({first}, fp32)")
    report.print(Table(
        [Column("model", "<16"), Column("opt", ">6"), Column("tuned MiB", ">12.1f"),
         Column("LoRA MiB", ">10.2f"), Column("reduction", ">11")],
        [(r["model"], r["optimizer"], r["tuned"]["total_bytes"] / 2**20,
          r["lowrank"]["total_bytes"] / 2**20, f"{r['reduction_percent']['total_bytes']:>10.1f}%")
         for r in table]))
    report.print(*_measured_lines(args.optimizer, measured, measured_model))
    return report
