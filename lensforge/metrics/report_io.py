"""Write and read per-layer lens metrics: `metrics.json` (all lenses) and a long-format CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from lensforge.errors import DataError

JSON_NAME = "metrics.json"
CSV_NAME = "metrics.csv"
CSV_FIELDS = ("lens", "layer", "metric", "value")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a killed run never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_safe(x: object) -> object:
    """Replace NaN / ±inf by None so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _long_rows(results: Mapping[str, Mapping[str, object]]) -> list[tuple[str, str, str, str]]:
    """One row per (lens, layer, metric). Per-layer lists use the layer index, `mean` entries
    use layer "mean", scalars (model_ce, ...) an empty layer. Missing values are empty."""
    rows = []
    for lens, res in results.items():
        layers = res.get("layers")
        for metric, value in res.items():
            if metric == "layers":
                continue
            if isinstance(value, list) and isinstance(layers, Sequence) and len(value) == len(layers):
                for layer, v in zip(layers, value, strict=True):
                    rows.append((lens, str(layer), metric, _cell(v)))
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if _is_number(v) or v is None:
                        rows.append((lens, str(metric), str(sub), _cell(v)))
            elif _is_number(value) or value is None:
                rows.append((lens, "", metric, _cell(value)))
    return rows


def _cell(v: object) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def write_layer_metrics(results: Mapping[str, Mapping[str, object]],
                        out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `metrics.json` and `metrics.csv` for several lenses into `out_dir`.

    Args:
        results: lens name -> `LayerMetricAccumulator.result()`-style dict (any JSON-able
            dict; lists as long as `layers` become per-layer CSV rows).
        out_dir: folder, created if missing.

    Returns:
        (json_path, csv_path). CSV columns: lens, layer, metric, value.
        In the CSV, `mean` entries have layer "mean" and scalars an empty layer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / JSON_NAME, out / CSV_NAME
    _atomic_write_text(json_path, json.dumps(_json_safe(results), indent=2, allow_nan=False))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    writer.writerows(_long_rows(results))
    _atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


def read_layer_metrics(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Read back what `write_layer_metrics` wrote (from `metrics.json`).

    Raises:
        DataError: the folder has no readable `metrics.json`.
    """
    path = Path(out_dir) / JSON_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found; run an evaluation that writes metrics first") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run the evaluation") from None


def read_layer_metrics_csv(out_dir: str | os.PathLike) -> list[dict[str, str | float | None]]:
    """Read `metrics.csv` as rows {lens, layer, metric, value}; empty values become None."""
    path = Path(out_dir) / CSV_NAME
    if not path.exists():
        raise DataError(f"{path} not found; run an evaluation that writes metrics first")
    with path.open(encoding="utf-8", newline="") as f:
        return [
            {**row, "value": float(row["value"]) if row["value"] else None}
            for row in csv.DictReader(f)
        ]
