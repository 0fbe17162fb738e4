"""The one layer every study command runs through.

A `cmd_*.py` study module is its arguments (`study_parser` + its own options) and one
function `Study -> Report`. `run_study` does the rest, in this order:

1. cheap checks, before any model loads: each lens folder named on the command line exists,
   then the command's own `check` (bad input is a one-line error at once);
2. the study function: `study.adapter` loads the model on first use, `study.lenses()`
   resolves lens folders with `load_lens` (the logit lens first);
3. --out is made and the report's files (JSON, CSV, figures, ...) are written into it;
4. the report's lines and tables are printed, then one `wrote ...` line.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from lensforge.cli.common import (
    HelpFormatter,
    add_model_args,
    load_model_from_args,
    parse_lens_specs,
)
from lensforge.cli.study_inputs import heldout_stream
from lensforge.errors import CheckpointError
from lensforge.lenses import Lens, LogitLens, load_lens
from lensforge.metrics import write_layer_metrics
from lensforge.models import ModelAdapter

LENSES_HELP = "lens folders, as PATH or NAME=PATH (the logit lens is always included)"
MISMATCH_HELP = "use lenses trained for another model (e.g. base lenses on instruct)"


# ----------------------------------------------------------------------------- parser
def command_parser(sub: argparse._SubParsersAction, name: str, func: Callable[..., int],
                   doc: str | None, *, help: str) -> argparse.ArgumentParser:
    """Add subcommand `name` running `func(args)`; its description is `doc` (the command
    module's docstring) after the first paragraph, its --help formatted by HelpFormatter."""
    description = (doc or "").partition("\n\n")[2].strip() or None
    p = sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


def study_parser(sub: argparse._SubParsersAction, name: str, body: StudyFn, doc: str | None,
                 *, help: str, out: str, lenses: str | None = None,
                 lens_help: str = LENSES_HELP, mismatch: bool | str = False, model: bool = True,
                 check: Callable[[argparse.Namespace], object] | None = None,
                 lens_args: Sequence[str] = ("lenses",)) -> argparse.ArgumentParser:
    """`command_parser` for a study: `name` runs `body` through `run_study`, with positional
    lens folders (`lenses` is their nargs; None: none), --allow-mismatch (if `mismatch`; a
    string is its help), the model options, and --out (default runs/OUT). `check(args)` and the lens
    folders named by `lens_args` are checked before the model loads."""
    run = functools.partial(run_study, body=body, check=check, lens_args=tuple(lens_args))
    p = command_parser(sub, name, run, doc, help=help)
    if lenses:
        p.add_argument("lenses", nargs=lenses, help=lens_help)
    if mismatch:
        p.add_argument("--allow-mismatch", action="store_true",
                       help=mismatch if isinstance(mismatch, str) else MISMATCH_HELP)
    if model:
        add_model_args(p)
    p.add_argument("--out", default=f"runs/{out}", help="output folder")
    return p


# ------------------------------------------------------------------------------ study
@dataclass
class Study:
    """One run of a study command: its arguments, the model (loaded on first use), --out."""

    args: argparse.Namespace

    @cached_property
    def adapter(self) -> ModelAdapter:
        return load_model_from_args(self.args)

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    def lenses(self, specs: Mapping[str, Path] | None = None, *, logit: bool = True,
               allow_mismatch: bool | None = None) -> dict[str, Lens]:
        """{name: lens} for `specs` (default: the positional lens folders), bound to the
        model, after the logit lens when `logit`. `allow_mismatch` defaults to the flag."""
        if specs is None:
            specs = parse_lens_specs(self.args.lenses)
        if allow_mismatch is None:
            allow_mismatch = getattr(self.args, "allow_mismatch", False)
        lenses: dict[str, Lens] = {"logit": LogitLens.from_model(self.adapter)} if logit else {}
        for name, path in specs.items():
            lenses[name] = load_lens(path, self.adapter, allow_mismatch=allow_mismatch)
        return lenses


def require_lens_folders(specs: Mapping[str, Path]) -> None:
    """CheckpointError for a named lens folder that does not exist ('logit' is built in)."""
    for name, path in specs.items():
        if not path.exists() and path.name != "logit":
            raise CheckpointError(f"lens folder {path} does not exist"
                                  + ("" if path.name == name else f" (lens '{name}')"))


# ----------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Column:
    """A table column: cells are `format(value, spec)`; the title takes the spec's
    alignment and width. `gap` is printed before the column."""

    title: str
    spec: str = ""
    gap: str = ""

    def head(self) -> str:
        align_width = re.match(r"[<>^=]?\d*", self.spec)
        return self.gap + format(self.title, align_width.group(0) if align_width else "")

    def cell(self, value: object) -> str:
        return self.gap + format(value, self.spec)


@dataclass
class Table:
    columns: Sequence[Column]
    rows: Iterable[Sequence[object]]
    header: str | None = None  # printed instead of the column titles

    def lines(self) -> list[str]:
        head = self.header if self.header is not None else "".join(c.head() for c in self.columns)
        return [head] + ["".join(c.cell(v) for c, v in zip(self.columns, row, strict=True))
                         for row in self.rows]


@dataclass
class Output:
    """A file of the report: `write(path)` writes it at --out/name (and may write siblings);
    `listed` are the names the `wrote` line shows for it."""

    name: str
    write: Callable[[Path], Any]
    listed: tuple[str, ...]


@dataclass
class Report:
    """What a study produced: files for --out, and what to print (lines and tables)."""

    files: list[Output] = field(default_factory=list)
    printed: list[str | Table] = field(default_factory=list)

    def file(self, name: str, write: Callable[[Path], Any], *,
             listed: Sequence[str] | None = None) -> None:
        self.files.append(Output(name, write, (name,) if listed is None else tuple(listed)))

    def json(self, name: str, data: object, *, nan_as_null: bool = False,
             listed: Sequence[str] | None = None) -> None:
        """Indented JSON; `nan_as_null` for strict JSON (NaN becomes null)."""
        text = json.dumps(nan_to_none(data) if nan_as_null else data, indent=2)
        self.file(name, lambda path: path.write_text(text), listed=listed)

    def csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[object]], *,
            crlf: bool = False) -> None:
        """A CSV file; `crlf`: the csv module's (spreadsheet) line ends."""
        def write(path: Path) -> None:
            with path.open("w", newline="") as f:
                writer = csv.writer(f, lineterminator="\r\n" if crlf else "\n")
                writer.writerow(header)
                writer.writerows(rows)
        self.file(name, write)

    def records(self, name: str, records: Sequence[Mapping[str, object]],
                fields: Sequence[str] | None = None, *, crlf: bool = False) -> None:
        """A CSV of dicts, one row each; columns `fields` (default: the first one's keys)."""
        fields = list(fields or records[0])
        self.csv(name, fields, ([r.get(k, "") for k in fields] for r in records), crlf=crlf)

    def figure(self, name: str, plot: Callable[..., Any], data: object, **kwargs: Any) -> None:
        """`plot(data, path, **kwargs)`, the convention of every lensforge.viz figure."""
        self.file(name, lambda path: plot(data, path, **kwargs))

    def layer_metrics(self, results: Mapping[str, Mapping[str, Any]],
                      listed: Sequence[str] = ("metrics.json",)) -> None:
        """metrics.json and metrics.csv: per-layer metrics per lens."""
        self.file("metrics.json", lambda path: write_layer_metrics(results, path.parent),
                  listed=listed)

    def print(self, *items: str | Table) -> None:
        self.printed.extend(items)


def publish(report: Report, out: Path) -> list[Path]:
    """Write the report's files into `out` (made), print it, list the files announced."""
    out.mkdir(parents=True, exist_ok=True)
    for f in report.files:
        f.write(out / f.name)
    for item in report.printed:
        for line in item.lines() if isinstance(item, Table) else [item]:
            print(line)
    written = [out / name for f in report.files for name in f.listed]
    print("wrote " + ", ".join(str(p) for p in written))
    return written


StudyFn = Callable[[Study], Report]


def run_study(args: argparse.Namespace, *, body: StudyFn,
              check: Callable[[argparse.Namespace], object] | None = None,
              lens_args: Sequence[str] = ("lenses",)) -> int:
    """Checks, the study, its files and summary (see the module docstring); exit code 0."""
    for attr in lens_args:
        value = getattr(args, attr, None)
        if value:
            require_lens_folders(parse_lens_specs([value] if isinstance(value, str) else value))
    if check is not None:
        check(args)
    study = Study(args)
    publish(body(study), study.out)
    return 0


def evaluation_report(adapter: ModelAdapter, lenses: Mapping[str, Lens], data: str,
                      text_field: str, seq_len: int, batch_size: int, tokens: int,
                      reference: str | None) -> tuple[dict, Report]:
    """Evaluate on held-out `data`: the per-lens results, and the report of them
    (metrics.json/csv, raf.json, layers.png and the per-lens table)."""
    from lensforge.evaluation import evaluate, raf_table
    from lensforge.viz.curves import plot_layer_curves

    stream = heldout_stream(adapter, data, text_field, seq_len)
    results = evaluate(adapter, lenses, stream.batches(batch_size), max_tokens=tokens)
    if reference is None and "tuned" in results:
        reference = "tuned"
    raf = raf_table(results, reference) if reference else {}
    report = Report()
    report.layer_metrics(results, listed=("metrics.json", "metrics.csv"))
    report.json("raf.json", {"reference": reference, "raf": raf}, listed=())
    report.figure("layers.png", plot_layer_curves, results,
                  title=f"{adapter.model_id}: lenses per layer")
    report.print(Table(
        [Column("lens", "<14"), Column("mean KL", ">10.3f"), Column("mean CE", ">10.3f"),
         Column("P@1", ">8.3f"), Column("RAF", ">8")],
        [(name, res["mean"]["kl"], res["mean"]["ce"], res["mean"]["precision@1"],
          f"{raf[name]:.3f}" if name in raf else "") for name, res in results.items()]))
    return results, report


def evaluate_to_folder(adapter: ModelAdapter, lenses: Mapping[str, Lens], data: str,
                       text_field: str, seq_len: int, batch_size: int, tokens: int, out: Path,
                       reference: str | None) -> dict:
    """`evaluation_report`, written into `out` and printed; returns the per-lens results."""
    results, report = evaluation_report(adapter, lenses, data, text_field, seq_len,
                                        batch_size, tokens, reference)
    publish(report, out)
    return results


def nan_to_none(x: object) -> object:
    """Strict JSON: NaN (e.g. exit precision when nothing exits) becomes null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x
