"""lensforge track: tracked rows equal `lensforge spectrum` / `eval` on the saved milestone
lenses; resume continues without redoing milestones; bad options exit 2 before the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_folder import make_tiny_model_dir, write_corpus

import lensforge.analysis.tracking as tracking
import lensforge.cli.cmd_track as cmd_track
from lensforge.cli.main import main

pytestmark = pytest.mark.integration  # lensforge track as a user runs it

SPECTRUM = ("effective_rank", "energy_top_half", "components_90", "participation_ratio")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.mktemp("track")
    return {"model": make_tiny_model_dir(base / "model"),
            "corpus": write_corpus(base / "corpus.txt", n_docs=120), "base": base}


def _common(ws) -> list[str]:
    return ["--model", str(ws["model"]), "--dtype", "float32", "--seq-len", "16",
            "--batch-size", "2"]


def _track_args(ws, out: Path, *extra: str) -> list[str]:
    return ["track", *_common(ws), "--data", str(ws["corpus"]), "--eval-data",
            str(ws["corpus"]), "-k", "4", "8", "--tokens", "256", "--tokens-per-step", "32",
            "--milestones", "64", "128", "256", "--init-tokens", "64", "--eval-tokens", "64",
            "--no-progress", "--out", str(out), *extra]


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "track.json").read_text())["rows"]


@pytest.fixture(scope="module")
def tracked(ws):
    out = ws["base"] / "run"
    assert main(_track_args(ws, out, "--recipes", "tuned-lens", "lensforge")) == 0
    return out


def test_figure_panels_draw_the_tracked_numbers(tracked):
    from lensforge.viz.tracking_figures import plt, tracking_figure

    rows = _rows(tracked)
    fig = tracking_figure(rows)
    axes = fig.axes
    assert [ax.get_title()[:3] for ax in axes] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    want = sorted((r["tokens"], 100 * r["effective_rank_over_h"]) for r in rows
                  if r["recipe"] == "lensforge" and r["lens"] == "tuned")
    assert list(lines["lensforge"].get_ydata()) == pytest.approx([v for _, v in want])
    kl = {line.get_label(): line for line in axes[4].get_lines()}
    for recipe in ("tuned-lens", "lensforge"):
        for lens, label in (("tuned", "tuned"), ("lora_k4", "k=4")):
            want = sorted((r["tokens"], r["kl"]) for r in rows
                          if r["recipe"] == recipe and r["lens"] == lens)
            assert list(kl[f"{recipe} {label}"].get_ydata()) == pytest.approx(
                [v for _, v in want])
    assert any(name.startswith("logit lens") for name in kl)
    plt.close(fig)


def test_rows_files_and_figure(tracked):
    rows = _rows(tracked)
    # 2 recipes x (step 0 + 3 milestones) x (tuned + 2 LoRA)
    assert len(rows) == 2 * 4 * 3
    assert {(r["recipe"], r["tokens"]) for r in rows} == {
        (rec, t) for rec in ("tuned-lens", "lensforge") for t in (0, 64, 128, 256)}
    csv_lines = (tracked / "track.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and csv_lines[0].startswith("recipe,milestone")
    assert (tracked / "tracking.png").stat().st_size > 20_000
    zero = {r["lens"]: r for r in rows if r["recipe"] == "tuned-lens" and r["tokens"] == 0}
    # From zero, every lens starts as the logit lens: a zero translator, the logit KL.
    assert zero["tuned"]["effective_rank"] == 0 and zero["tuned"]["kl"] == zero["tuned"]["kl_logit"]
    tuned = [r for r in rows if r["recipe"] == "tuned-lens" and r["lens"] == "tuned"]
    assert len({round(r["kl"], 9) for r in tuned}) == 4  # the lens moves between milestones
    assert tuned[-1]["kl"] < tuned[0]["kl"]
    # The last milestone is the trained lens train() writes at the end.
    final = load_file(tracked / "tuned-lens" / "train" / "lenses" / "tuned" / "lens.safetensors")
    saved = load_file(tracked / "tuned-lens" / "milestones" / "256" / "tuned" / "lens.safetensors")
    assert all(torch.equal(final[k], saved[k]) for k in final)
    early = load_file(tracked / "tuned-lens" / "milestones" / "64" / "tuned" / "lens.safetensors")
    assert not torch.equal(early["weight"], saved["weight"])


@pytest.mark.parametrize(("recipe", "tokens"), [("tuned-lens", 128), ("lensforge", 0)])
def test_tracked_row_equals_spectrum_and_eval_of_the_saved_lens(ws, tracked, tmp_path, recipe,
                                                                 tokens):
    folder = tracked / recipe / "milestones" / str(tokens)
    specs = [f"{name}={folder / name}" for name in ("tuned", "lora_k4", "lora_k8")]
    assert main(["spectrum", *specs, "--out", str(tmp_path / "spec")]) == 0
    assert main(["eval", *specs, *_common(ws), "--data", str(ws["corpus"]), "--tokens", "64",
                 "--out", str(tmp_path / "eval")]) == 0
    spectrum = json.loads((tmp_path / "spec" / "spectrum.json").read_text())
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    raf = json.loads((tmp_path / "eval" / "raf.json").read_text())
    rows = {r["lens"]: r for r in _rows(tracked) if r["recipe"] == recipe and r["tokens"] == tokens}
    assert set(rows) == {"tuned", "lora_k4", "lora_k8"}
    for name, row in rows.items():
        for m in SPECTRUM:
            assert row[m] == pytest.approx(spectrum[name]["mean"][m], rel=1e-9, abs=1e-12), m
            assert row["per_layer"][m] == pytest.approx(spectrum[name][m], rel=1e-9, abs=1e-12)
        assert row["effective_rank_over_h"] == pytest.approx(spectrum[name]["effective_rank_over_h"])
        assert row["kl"] == pytest.approx(metrics[name]["mean"]["kl"], rel=1e-5)
        assert row["kl_per_layer"] == pytest.approx(metrics[name]["kl"], rel=1e-5, abs=1e-7)
        assert row["kl_logit"] == pytest.approx(metrics["logit"]["mean"]["kl"], rel=1e-5)
        if name == "tuned":
            assert row["raf"] is None
        else:
            assert row["raf"] == pytest.approx(raf["raf"][name], rel=1e-4, abs=1e-7)
    assert rows["tuned"]["effective_rank"] > 0  # a real spectrum, not the zero lens's


class _Interrupt(KeyboardInterrupt):
    pass


def test_resume_continues_without_redoing_milestones(ws, tmp_path, monkeypatch):
    args = ("--recipes", "tuned-lens", "--checkpoint-every", "1")
    straight = tmp_path / "straight"
    assert main(_track_args(ws, straight, *args)) == 0

    measured: list[int] = []
    real = tracking.measure

    def counting(cfg, adapter, lenses, readout=None, logit=None):
        measured.append(1)
        if stop_at and len(measured) == stop_at:
            raise _Interrupt  # killed while measuring: the step's checkpoint is on disk
        return real(cfg, adapter, lenses, readout, logit)

    monkeypatch.setattr(tracking, "measure", counting)
    out = tmp_path / "resumed"
    stop_at = 3  # milestones 0 and 64 recorded, killed while measuring 128
    assert main(_track_args(ws, out, *args)) == 130
    assert sorted({r["tokens"] for r in _rows(out)}) == [0, 64]
    assert main(_track_args(ws, out, *args)) == 2  # a previous run: --resume or --overwrite
    measured.clear()
    stop_at = 0
    assert main(_track_args(ws, out, *args, "--resume")) == 0
    assert len(measured) == 2  # 128 (caught up from the checkpoint) and 256, nothing redone
    got, want = _rows(out), _rows(straight)
    assert [(r["tokens"], r["lens"]) for r in got] == [(r["tokens"], r["lens"]) for r in want]
    for g, w in zip(got, want, strict=True):
        for m in ("kl", "effective_rank", "participation_ratio"):
            assert g[m] == pytest.approx(w[m], rel=1e-6, abs=1e-9), (g["tokens"], g["lens"], m)
    measured.clear()
    assert main(_track_args(ws, out, *args, "--resume")) == 0  # all done: nothing to measure
    assert measured == []
    # Changed options cannot silently mix with the tracked rows.
    assert main(_track_args(ws, out, "--recipes", "tuned-lens", "--eval-tokens", "32",
                            "--resume")) == 2


@pytest.mark.parametrize("bad", [
    ["--milestones", "64", "512"],          # beyond --tokens
    ["--milestones", "40", "60"],           # both fall on step 2 (32 tokens per step)
    ["--lr", "tuned-lens=abc"],
    ["--lr", "lora-lens=0.1", "--recipes", "tuned-lens"],
    ["--tokens", "16"],                     # less than one optimizer step
    ["--data", "/nonexistent/corpus.txt"],
])
def test_bad_options_exit_2_before_the_model_loads(ws, tmp_path, monkeypatch, bad):
    def no_model(args):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(cmd_track, "load_model_from_args", no_model)
    args = _track_args(ws, tmp_path / "out")
    # later options win in argparse, so the bad ones go last
    assert main([*args, *bad]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [["--recipes", "nope"], ["--loss", "reference"], ["-k", "0"]])
def test_bad_choices_are_argparse_errors(ws, tmp_path, bad):
    with pytest.raises(SystemExit) as exc:
        main([*_track_args(ws, tmp_path / "out"), *bad])
    assert exc.value.code == 2
