"""`lensforge export` / `lensforge import`: round trips through tuned-lens 0.2.0 format on a
tiny model, and one-line refusals (exit 2) of bad inputs, before any model load."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from tiny_folder import make_tiny_model_dir

from lensforge.cli import cmd_import
from lensforge.cli.main import main
from lensforge.errors import LensMismatchError
from lensforge.lenses import LogitLens, LowRankLens, TunedLens, load_lens, save_lens
from lensforge.models import load_model

pytestmark = pytest.mark.integration  # lensforge as a user runs it


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("export_import")
    model_dir = make_tiny_model_dir(base / "model")
    other_dir = make_tiny_model_dir(base / "other", seed=7)  # same shapes, another W_U
    adapter = load_model(str(model_dir), dtype="float32")
    gen = torch.Generator().manual_seed(0)
    tuned = TunedLens.from_model(adapter)
    lowrank = LowRankLens.from_model(adapter, rank=4)
    with torch.no_grad():  # non-trivial weights: a lens equal to the logit lens proves nothing
        for lens in (tuned, lowrank):
            for p in lens.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = torch.randint(3, 30, (2, 12), generator=gen)
    return {
        "base": base, "model": model_dir, "other": other_dir, "adapter": adapter,
        "hidden": adapter.hidden_states(ids)[:-1],  # [L, B, T, H], the lens inputs
        "tuned": save_lens(tuned, base / "tuned"),
        "lowrank": save_lens(lowrank, base / "lowrank"),
        "logit": save_lens(LogitLens.from_model(adapter), base / "logit_lens"),
    }


def _logits(lens, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([lens(hidden[i], i) for i in range(hidden.shape[0])])


def _export(src: Path, out: Path) -> int:
    return main(["export", str(src), "--format", "tuned-lens", str(out)])


def _import(src: Path, model: Path, out: Path, *extra: str) -> int:
    return main(["import", str(src), "--model", str(model), "--dtype", "float32", str(out),
                 *extra])


def test_tuned_round_trip_gives_identical_logits(ws, tmp_path, capsys):
    tl, back = tmp_path / "tl", tmp_path / "back"
    assert _export(ws["tuned"], tl) == 0
    assert sorted(p.name for p in tl.iterdir()) == ["config.json", "params.pt"]
    tl_cfg = json.loads((tl / "config.json").read_text())
    assert (tl_cfg["num_hidden_layers"], tl_cfg["d_model"]) == (3, 32)
    params = torch.load(tl / "params.pt", weights_only=True)
    assert sorted(params) == sorted(f"{i}.{k}" for i in range(3) for k in ("weight", "bias"))
    back.mkdir()  # an existing empty OUT is fine
    assert _import(tl, ws["model"], back) == 0
    assert "wrote" in capsys.readouterr().out

    adapter = ws["adapter"]
    original, again = load_lens(ws["tuned"], adapter), load_lens(back, adapter)
    assert again.config.lens_type == "tuned"
    assert again.config.unembed_hash == adapter.unembedding_hash()
    assert torch.equal(_logits(original, ws["hidden"]), _logits(again, ws["hidden"]))
    # the hash binds it: the same-shaped model with another unembedding refuses it
    with pytest.raises(LensMismatchError):
        load_lens(back, load_model(str(ws["other"]), dtype="float32"))


def test_lowrank_exports_as_its_dense_equivalent(ws, tmp_path, capsys):
    tl, back = tmp_path / "tl", tmp_path / "back"
    assert _export(ws["lowrank"], tl) == 0
    assert "dense equivalent" in capsys.readouterr().out
    assert _import(tl, ws["model"], back) == 0
    adapter = ws["adapter"]
    lora, dense = load_lens(ws["lowrank"], adapter), load_lens(back, adapter)
    assert isinstance(dense, TunedLens)
    for i in range(3):
        assert torch.allclose(dense.weight[i], lora.up[i] @ lora.down[i])
    expected, got = _logits(lora, ws["hidden"]), _logits(dense, ws["hidden"])
    logit = _logits(load_lens(ws["logit"], adapter), ws["hidden"])
    assert not torch.allclose(expected, logit, atol=1e-2)  # the lens does something
    # (h B^T) A^T vs h (A B)^T: the same map, rounded differently
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_import_of_our_export_is_exactly_ours_again(ws, tmp_path):
    """tuned-lens -> ours -> tuned-lens keeps every tensor bit for bit."""
    tl1, ours, tl2 = tmp_path / "tl1", tmp_path / "ours", tmp_path / "tl2"
    assert _export(ws["tuned"], tl1) == 0
    assert _import(tl1, ws["model"], ours) == 0
    assert _export(ours, tl2) == 0
    a, b = (torch.load(p / "params.pt", weights_only=True) for p in (tl1, tl2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tuned_lens_folder(folder: Path, *, layers: int = 3, hidden: int = 32,
                       state: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"d_model": hidden, "num_hidden_layers": layers, "bias": True}))
    if state is None:
        state = {f"{i}.{k}": torch.zeros(*((hidden, hidden) if k == "weight" else (hidden,)))
                 for i in range(layers) for k in ("weight", "bias")}
    torch.save(state, folder / "params.pt")
    return folder


def _bad_case(case: str, ws: dict, tmp: Path) -> tuple[list[str], Path, str]:
    """(argv, OUT, a word the error must contain) for one bad input."""
    out = tmp / "out"
    full = tmp / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    tl = tmp / "tl"
    model = str(ws["model"])
    imp = ["import", str(tl), "--model", model, "--dtype", "float32", str(out)]
    if case == "export-missing-lens":
        return ["export", str(tmp / "nope"), str(out)], out, "no lens"
    if case == "export-logit-lens":
        return ["export", str(ws["logit"]), str(out)], out, "logit lens"
    if case == "export-out-not-empty":
        return ["export", str(ws["tuned"]), str(full)], full, "not empty"
    if case == "export-out-is-file":
        return ["export", str(ws["tuned"]), str(full / "notes.txt")], full, "file"
    if case == "import-out-not-empty":
        _tuned_lens_folder(tl)
        return [*imp[:-1], str(full)], full, "not empty"
    if case == "import-our-own-lens":
        return ["import", str(ws["tuned"]), "--model", model, str(out)], out, "already"
    if case == "import-no-params":
        tl.mkdir()
        (tl / "config.json").write_text("{}")
        return imp, out, "params.pt"
    if case == "import-bad-config":
        _tuned_lens_folder(tl)
        (tl / "config.json").write_text('{"d_model": "big", "num_hidden_layers": 3}')
        return imp, out, "d_model"
    if case == "import-shape-mismatch":
        _tuned_lens_folder(tl, hidden=16)
        return imp, out, "H=16"
    if case == "import-pickled-code":
        _tuned_lens_folder(tl, state={"0.weight": argparse.Namespace(x=1)})
        return imp, out, "pickled"
    if case == "import-wrong-tensors":
        _tuned_lens_folder(tl, state={"0.weight": torch.zeros(32, 32)})
        return imp, out, "disagree"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "export-missing-lens", "export-logit-lens", "export-out-not-empty", "export-out-is-file",
    "import-out-not-empty", "import-our-own-lens", "import-no-params", "import-bad-config",
    "import-shape-mismatch", "import-pickled-code", "import-wrong-tensors",
])
def test_bad_inputs_are_refused_in_one_line_before_the_model_loads(ws, tmp_path, capsys,
                                                                   monkeypatch, case):
    def no_model(args: argparse.Namespace) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cmd_import, "load_model_from_args", no_model)
    argv, out, word = _bad_case(case, ws, tmp_path)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    assert word in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


def test_import_checks_shapes_on_the_loaded_model(ws, tmp_path, capsys):
    """With --layers-path the config pre-check is skipped; binding still refuses."""
    tl = _tuned_lens_folder(tmp_path / "tl", layers=5)
    code = _import(tl, ws["model"], tmp_path / "out", "--layers-path", "model.layers")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "L=5" in err, err
    assert not (tmp_path / "out").exists()


def test_import_needs_a_model(ws, tmp_path, capsys):
    tl = _tuned_lens_folder(tmp_path / "tl")
    with pytest.raises(SystemExit) as exc:
        main(["import", str(tl), str(tmp_path / "out")])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
