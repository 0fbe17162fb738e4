"""One self-contained HTML report for a `lensforge run` / `lensforge eval` folder.

Reads what the run wrote (summary.json, metrics.json, raf.json, train/train_history.json,
train/lenses/*) and renders: per-layer curves of every metric for every lens, a table of
means and RAF, the per-step training KL of each lens, trajectory grids of a few held-out samples (this needs the
model, so it is optional), the configuration and the timings. Images are embedded as
base64 data URIs; the grid script is inlined; the page makes no network request.
"""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lensforge.errors import DataError, LensforgeError
from lensforge.storage import atomic_write_text
from lensforge.viz.html import html_page, image_data_uri, is_finite_number, trajectory_fragment

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

REPORT_NAME = "report.html"


def write_run_report(
    run_dir: Path,
    *,
    out: Path | None = None,
    samples: int = 3,
    sample_tokens: int = 40,
    adapter: ModelAdapter | None = None,
) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path.

    Args:
        run_dir: a folder written by `lensforge run` or `lensforge eval`.
        samples: held-out texts shown as trajectory grids (0 = none; needs the model, loaded
            from summary.json's model id unless `adapter` is given, and train/lenses/).
        sample_tokens: tokens per sample grid.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist")
    summary = _read_json(run_dir / "summary.json")
    metrics = _read_json(run_dir / "metrics.json")
    history = _read_json(run_dir / "train" / "train_history.json")
    raf = _read_json(run_dir / "raf.json")
    if metrics is None and summary is None and history is None:
        raise DataError(f"{run_dir} holds no summary.json, metrics.json or "
                        "train/train_history.json: is it a lensforge run folder?")
    model_id = ((summary or {}).get("model") or {}).get("model_id", "")
    title = f"lensforge run report: {run_dir.name}" + (f" ({model_id})" if model_id else "")
    sections = [f"<h1>{html.escape(title)}</h1>",
                f'<div class="lf-sub">{html.escape(str(run_dir.resolve()))}</div>']
    if metrics:
        sections.append(_metrics_section(metrics, raf, model_id))
    if history and history.get("history"):
        loss = (history.get("config") or {}).get("loss")
        sections.append(training_panel(history["history"], loss=loss)[0])
    has_widgets = False
    if samples > 0:
        html_samples, has_widgets = _samples_section(run_dir, summary, samples, sample_tokens,
                                                     adapter)
        sections.append(html_samples)
    sections.append(_config_section(summary, history))
    page = html_page(title, "\n".join(sections), with_script=has_widgets)
    path = Path(out) if out else run_dir / REPORT_NAME
    return atomic_write_text(path, page)  # a kill never leaves half a report


# ---------------------------------------------------------------- sections
def _metrics_section(metrics: dict, raf: dict | None, model_id: str) -> str:
    from lensforge.viz.curves import plot_layer_curves

    results = {name: res for name, res in metrics.items() if isinstance(res, dict)}
    per_layer = []
    for res in results.values():
        n = len(res.get("layers", []))
        for key, value in res.items():
            if key not in ("layers", "n_tokens") and isinstance(value, list) and len(value) == n and \
                    key not in per_layer:
                per_layer.append(key)
    parts = ["<h2>Per-layer metrics (held-out text)</h2>"]
    if per_layer:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_layer_curves(results, Path(tmp) / "curves.png", metrics=per_layer,
                                    title=f"{model_id}: every metric per layer" if model_id
                                    else None)
            parts.append(f'<img class="lf-fig" alt="per-layer metrics" src="{image_data_uri(png)}">')
    raf_values = (raf or {}).get("raf") or {}
    means = sorted({k for res in results.values() for k in (res.get("mean") or {})})
    if means:
        head = "".join(f"<th>{html.escape(k)}</th>" for k in means)
        ref = (raf or {}).get("reference")
        raf_head = f"<th>RAF vs {html.escape(str(ref))}</th>" if raf_values else ""
        rows = []
        for name, res in results.items():
            cells = "".join(f"<td>{_num((res.get('mean') or {}).get(k))}</td>" for k in means)
            raf_cell = f"<td>{_num(raf_values.get(name))}</td>" if raf_values else ""
            base = _num(res.get("model_ce"))
            rows.append(f"<tr><th>{html.escape(name)}</th>{cells}{raf_cell}<td>{base}</td></tr>")
        parts.append('<p>Means over layers (nats where applicable); model CE is the model\'s '
                     'own cross-entropy on the same tokens.</p>')
        parts.append(f'<table class="lf-kv"><tr><th>lens</th>{head}{raf_head}'
                     f'<th>model CE</th></tr>{"".join(rows)}</table>')
    return "\n".join(parts)


def training_panel(history: list[dict], *, loss: str | None = None
                   ) -> tuple[str, dict[str, tuple[list[int], list[float]]]]:
    """The "Training" section: per-step KL (mean over layers) per lens from the records'
    `kl_mean`, and the series drawn (lens -> (steps, KL)), for checks against the JSON."""
    from lensforge.viz.curves import plot_training_kl

    head = "<h2>Training</h2>"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.png"
        drawn = plot_training_kl(history, path)
        if not drawn:
            return head + ('<p class="lf-warn">train_history.json records no per-step KL '
                           '(<code>kl_mean</code>).</p>'), {}
        uri = image_data_uri(path)
    note = ("<p>KL(final layer ‖ lens) per optimizer step, averaged over layers and the "
            "step's tokens, one line per lens (nats).")
    if loss == "subset":
        note += (" Trained with <code>--loss subset</code>: these are the sampled estimates "
                 "the optimizer saw (biased low, noisy); the held-out KL above is exact.")
    note += "</p>"
    return head + note + f'<img class="lf-fig" alt="training KL per step" src="{uri}">', drawn


def _samples_section(run_dir: Path, summary: dict | None, n: int, tokens: int,
                     adapter: ModelAdapter | None) -> tuple[str, bool]:
    """Trajectory grids of held-out samples; a note instead when they cannot be made."""
    head = "<h2>Prediction trajectories on held-out samples</h2>"
    lens_dir = run_dir / "train" / "lenses"
    cfg = (summary or {}).get("train_config") or {}
    model = cfg.get("model") or ((summary or {}).get("model") or {}).get("model_id")
    if not lens_dir.is_dir() or not model:
        return head + ('<p class="lf-warn">No samples: the run folder has no train/lenses/ '
                       'or summary.json names no model.</p>'), False
    try:
        from lensforge.analysis.trajectory import PredictionTrajectory
        from lensforge.data import iter_documents
        from lensforge.lenses import LogitLens, load_lens
        from lensforge.models import load_model

        if adapter is None:
            adapter = load_model(model, dtype=cfg.get("dtype", "float32"))
        lenses = {"logit": LogitLens.from_model(adapter)}
        for folder in sorted(p for p in lens_dir.iterdir() if p.is_dir()):
            lenses[folder.name] = load_lens(folder, adapter)
        texts = _heldout_texts(iter_documents(cfg.get("data", "stdlib"),
                                              text_field=cfg.get("text_field", "text"),
                                              split="heldout"), n)
        trajs = PredictionTrajectory.from_texts(adapter, texts, lenses, max_tokens=tokens)
    except (LensforgeError, OSError) as exc:
        return head + f'<p class="lf-warn">Samples skipped: {html.escape(str(exc))}</p>', False
    main = list(lenses)[-1]
    frags = [trajectory_fragment(t, stat="kl", lens=main,
                                 compare="logit" if main != "logit" else None)
             for t in trajs]
    note = (f"<p>{len(trajs)} held-out texts, first {tokens} tokens each; lenses: "
            f"{html.escape(', '.join(lenses))}. Colored by KL to the final layer.</p>")
    return head + note + "\n".join(frags), True


def _heldout_texts(documents: Iterable[str], n: int) -> list[str]:
    """The first `n` documents, each starting at its first non-blank line."""
    out = []
    for doc in documents:
        text = doc.strip()
        if len(text) >= 40:
            out.append(text[:4000])
        if len(out) == n:
            break
    return out


def _config_section(summary: dict | None, history: dict | None) -> str:
    parts = ["<h2>Configuration and timings</h2>"]
    summary = summary or {}
    model = summary.get("model")
    config = summary.get("train_config") or (history or {}).get("config")
    timings = summary.get("timings") or (history or {}).get("timings")
    for label, table in (("model", model), ("training configuration", config),
                         ("timings (seconds)", timings)):
        if table:
            parts.append(f"<h3>{label}</h3>{_kv_table(table)}")
    extra = {k: v for k, v in summary.items() if k not in ("model", "train_config", "timings")}
    if extra:
        parts.append(f"<h3>summary</h3>{_kv_table(extra)}")
    return "\n".join(parts)


def _kv_table(table: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_value(v)}</td></tr>"
                   for k, v in table.items())
    return f'<table class="lf-kv">{rows}</table>'


def _value(v: object) -> str:
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, (dict, list)):
        return f"<code>{html.escape(json.dumps(v))}</code>"
    return html.escape(str(v))


def _num(v: object) -> str:
    if not is_finite_number(v):
        return "—"
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
