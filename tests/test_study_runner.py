"""The study runner (cli/study.py) and the readable per-layer figures (viz/offscale.py)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from lensforge.cli import common
from lensforge.cli.main import main
from lensforge.cli.study import Column, Report, Table, publish
from lensforge.viz.curves import plot_layer_curves
from lensforge.viz.offscale import HEADROOM, readable_ylim

pytestmark = pytest.mark.unit  # plain data; no model is ever loaded

CLI = Path(__file__).resolve().parents[1] / "lensforge" / "cli"


# ----------------------------------------------------------------------------- table
def test_table_titles_take_alignment_and_width_of_the_cell_spec() -> None:
    table = Table([Column("lens", "<6"), Column("KL", ">8.3f"), Column("n", ">6,", gap="  "),
                   Column("CI", gap=" ")],
                  [("tuned", 0.12345, 12345, "[0.1, 0.2]"), ("logit", 2.0, 7, "")])
    assert table.lines() == ["lens        KL       n CI",
                             "tuned    0.123  12,345 [0.1, 0.2]",
                             "logit    2.000       7 "]
    assert Table([Column("a", ">3")], [(1,)], header="custom").lines() == ["custom", "  1"]


def test_publish_writes_files_prints_in_order_and_lists_what_is_listed(tmp_path, capsys):
    report = Report()
    report.json("r.json", {"x": math.nan}, nan_as_null=True)
    report.json("quiet.json", {"x": 1}, listed=())
    report.csv("r.csv", ("a", "b"), [(1, "x,y")], crlf=True)
    report.records("d.csv", [{"a": 1, "b": 2}, {"a": 3}])
    report.print("first line", Table([Column("a", ">2")], [(5,)]))
    out = tmp_path / "new" / "folder"
    written = publish(report, out)
    assert (out / "r.json").read_text() == '{\n  "x": null\n}'
    assert (out / "quiet.json").exists() and out / "quiet.json" not in written
    assert (out / "r.csv").read_bytes() == b'a,b\r\n1,"x,y"\r\n'
    assert (out / "d.csv").read_text() == "a,b\n1,2\n3,\n"
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["first line", " a", " 5",
                       f"wrote {out / 'r.json'}, {out / 'r.csv'}, {out / 'd.csv'}"]


# ------------------------------------------------------------------------------ runner
@pytest.mark.integration  # the CLI as a user runs it
def test_a_missing_lens_folder_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    attempts: list = []
    monkeypatch.setattr(common, "load_model", lambda *a, **k: attempts.append(a))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # enough for the preflight's path check
    for argv in (["depth", f"tuned={tmp_path / 'nope'}"],
                 ["causal-basis", "--lens", str(tmp_path / "nope")],
                 ["transfer", "logit", "--native", str(tmp_path / "nope")]):
        assert main([*argv, "--model", str(model), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "does not exist" in err, err
    assert attempts == [] and not (tmp_path / "o").exists()


# No exceptions: shared CLI helpers live in common.py or study.py.
KNOWN_CMD_IMPORTS: set[tuple[str, str]] = set()


def test_no_cli_module_imports_a_command_module() -> None:
    """Shared things live in study.py / study_inputs.py / common.py, not in a command."""
    found = set()
    for path in CLI.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found |= {(path.name, n) for n in names if n.startswith("lensforge.cli.cmd_")}
    assert found <= KNOWN_CMD_IMPORTS, found - KNOWN_CMD_IMPORTS


# ----------------------------------------------------------------------- readable axes
def _smollm_like() -> dict[str, dict]:
    """CE per layer: the logit lens from 110 nats (ppl 6e47) down, a tuned lens near 3-7."""
    layers = list(range(30))
    ce = {"logit": [3.1 + 107 * math.exp(-0.18 * i) for i in layers],
          "tuned": [3.0 + 4.5 * math.exp(-0.12 * i) for i in layers]}
    return {name: {"layers": layers, "ce": c, "ppl": [math.exp(x) for x in c],
                   "model_ce": 2.95, "model_ppl": math.exp(2.95)} for name, c in ce.items()}


def test_readable_ylim_gives_the_best_lens_a_third_of_the_axis() -> None:
    results = _smollm_like()
    series = {n: (r["layers"], r["ce"]) for n, r in results.items()}
    bottom, cap, top = readable_ylim(series, log=False, baselines=[2.95])
    tuned = results["tuned"]["ce"]
    assert bottom < 2.95 and cap < top < 20  # 110 nats off scale
    assert (max(tuned) - 2.95) / (top - bottom) > 1 / (1 + HEADROOM) - 0.05
    ppl = {n: (r["layers"], r["ppl"]) for n, r in results.items()}
    _, cap_ppl, _ = readable_ylim(ppl, log=True)
    assert max(results["tuned"]["ppl"]) < cap_ppl < 1e8
    # nothing far off: no clipping, however wide one lens alone is
    assert readable_ylim({"a": ([0, 1, 2], [10.0, 1.0, 0.001])}, log=True) is None
    assert readable_ylim({"a": ([0, 1], [0.17, 0.05]), "b": ([0, 1], [0.43, 0.09])},
                         log=False) is None


def test_layer_curves_clip_a_far_off_lens_and_say_so(tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    seen: list = []
    monkeypatch.setattr(plt, "close", lambda fig: seen.append(fig))
    plot_layer_curves(_smollm_like(), tmp_path / "c.png", metrics=("ce", "ppl"))
    ce_ax, ppl_ax = seen[0].axes[:2]
    assert ce_ax.get_ylim()[1] < 20 and ppl_ax.get_yscale() == "log"
    assert ppl_ax.get_ylim()[1] < 1e8
    for ax in (ce_ax, ppl_ax):
        notes = " ".join(t.get_text() for t in ax.texts)
        assert "off scale" in notes and "logit:" in notes and "tuned" not in notes
    assert (tmp_path / "c.png").stat().st_size > 0
