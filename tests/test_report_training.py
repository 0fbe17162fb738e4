"""The report's Training panel draws each lens's per-step KL from train_history.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.axes import Axes

from lensforge.training import TrainConfig, train
from lensforge.viz import report
from lensforge.viz.report import write_run_report

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run folder whose train/train_history.json comes from a real (tiny) training."""
    from tiny_folder import make_tiny_model_dir, write_corpus

    from lensforge.models import load_model

    tmp = tmp_path_factory.mktemp("report")
    adapter = load_model(str(make_tiny_model_dir(tmp / "model")), dtype="float32")
    run = tmp / "run"
    cfg = TrainConfig(model="tiny", data=str(write_corpus(tmp / "corpus.txt")),
                      lens_types=["tuned", "lowrank"], rank=4, init="zero", init_tokens=64,
                      tokens=384, tokens_per_step=64, batch_size=2, seq_len=16, lr=1e-2, seed=0,
                      checkpoint_every=100, out=str(run / "train"))
    train(cfg, adapter, progress=False)
    return run


def _expected(history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    lenses = history[0]["kl_mean"]
    return {name: ([r["step"] for r in history], [r["kl_mean"][name] for r in history])
            for name in lenses}


def test_report_plots_kl_per_lens_per_step(trained_run: Path, monkeypatch, tmp_path) -> None:
    history = json.loads((trained_run / "train" / "train_history.json").read_text())["history"]
    assert len(history) >= 5 and len(history[0]["kl_mean"]) == 2
    # Record every line the whole report draws (the run has no metrics.json: only training).
    drawn: list[tuple[str, list, list]] = []
    real_plot = Axes.plot

    def recording_plot(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(x), list(y)))
        return real_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    page = write_run_report(trained_run, out=tmp_path / "r.html", samples=0).read_text()
    assert "<h2>Training</h2>" in page and "data:image/png;base64," in page
    expected = _expected(history)
    assert {label for label, _, _ in drawn} == set(expected)  # one line per lens, labelled
    for label, x, y in drawn:
        steps, values = expected[label]
        assert x == steps
        assert y == pytest.approx(values)
        assert y != pytest.approx([r["seconds"] for r in history])  # not the step time


def test_training_panel_returns_the_series_it_drew(trained_run: Path) -> None:
    history = json.loads((trained_run / "train" / "train_history.json").read_text())["history"]
    html, drawn = report.training_panel(history)
    expected = _expected(history)
    assert set(drawn) == set(expected)
    for name, (steps, values) in expected.items():
        assert drawn[name][0] == steps and drawn[name][1] == pytest.approx(values)
    assert "training KL per step" in html


def test_training_panel_without_kl_says_so() -> None:
    html, drawn = report.training_panel([{"step": 1, "seconds": 140.0}, {"step": 2, "seconds": 86.0}])
    assert drawn == {} and "no per-step KL" in html and "<img" not in html
    # a lens missing at some step is a gap in that lens's line only
    html, drawn = report.training_panel([{"step": 1, "kl_mean": {"a": 2.0, "b": 3.0}},
                                  {"step": 2, "kl_mean": {"a": 1.5}}])
    assert drawn == {"a": ([1, 2], [2.0, 1.5]), "b": ([1], [3.0])}


def test_subset_training_is_labelled_as_an_estimate() -> None:
    """With --loss subset the per-step values are the sampled estimate, and the panel says so."""
    from lensforge.viz import report

    history = [{"step": 1, "kl_mean": {"a": 2.0}}, {"step": 2, "kl_mean": {"a": 1.5}}]
    assert "biased low" in report.training_panel(history, loss="subset")[0]
    assert "biased low" not in report.training_panel(history, loss="fused")[0]
