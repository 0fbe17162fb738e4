"""CLI input checks that must fail at once (exit 2, one line, no model load) and the
output-folder policy: lensforge never deletes or overwrites files it did not write."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from tiny_folder import make_tiny_model_dir, write_corpus

import lensforge.cli.common as common
from lensforge.cli.main import main

pytestmark = pytest.mark.integration  # lensforge as a user runs it


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.mktemp("rel")
    return {"model": make_tiny_model_dir(base / "model"),
            "corpus": write_corpus(base / "corpus.txt", n_docs=60)}


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model load is attempted; returns the list of attempts."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the input check")

    monkeypatch.setattr(common, "load_model", refuse)
    return calls


def _train(ws, out, *extra):
    return ["train", "--model", str(ws["model"]), "--dtype", "float32", "--data",
            str(ws["corpus"]), "--seq-len", "16", "--batch-size", "2", "--rank", "4",
            "--init-tokens", "64", "--tokens", "0", "--no-progress", "--out", str(out), *extra]


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "error:" in err and "internal" not in err, err
    return err


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ output folders
def test_out_folder_with_user_files_is_refused_and_untouched(ws, tmp_path, capsys, no_load):
    out = tmp_path / "D"
    (out / "lenses" / "lora_r4").mkdir(parents=True)
    (out / "lenses" / "lora_r4" / "my_notes.txt").write_text("mine")
    (out / "train_history.json").write_text('{"mine": true}')
    before = _tree(out)
    for extra in ((), ("--overwrite",), ("--resume",)):
        err = _one_line_error(capsys, main(_train(ws, out, *extra)))
        assert "my_notes.txt" in err and "train_history.json" in err
    assert _tree(out) == before and not no_load


def test_previous_run_needs_overwrite_or_resume(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(ws, out)) == 0
    first = _tree(out)
    assert "train_history.json" in first and "lenses/lora_r4/config.json" in first
    err = _one_line_error(capsys, main(_train(ws, out)))
    assert "--overwrite" in err and "--resume" in err
    assert _tree(out) == first
    assert main(_train(ws, out, "--overwrite")) == 0
    assert set(_tree(out)) == set(first)
    # a user's file inside a lens folder blocks even --overwrite, and survives
    (out / "lenses" / "lora_r4" / "README.md").write_text("notes")
    err = _one_line_error(capsys, main(_train(ws, out, "--overwrite")))
    assert "README.md" in err
    assert (out / "lenses" / "lora_r4" / "README.md").read_text() == "notes"


def test_overwrite_and_resume_together_are_refused(ws, tmp_path, capsys, no_load):
    _one_line_error(capsys, main(_train(ws, tmp_path / "o", "--overwrite", "--resume")))


@pytest.mark.parametrize("command", ["train", "run", "eval", "spectrum", "show"])
def test_out_of_the_wrong_kind_fails_before_work(ws, tmp_path, capsys, no_load, command):
    if command == "show":  # --out is a file here; a folder is the wrong kind
        wrong = tmp_path / "a_folder"
        wrong.mkdir()
        args = ["show", "some text", "--model", str(ws["model"]), "--out", str(wrong)]
    else:
        wrong = tmp_path / "a_file"
        wrong.write_text("keep me")
        args = {"train": _train(ws, wrong),
                "run": ["run", "--model", str(ws["model"]), "--out", str(wrong)],
                "eval": ["eval", "--model", str(ws["model"]), "--out", str(wrong)],
                "spectrum": ["spectrum", "logit", "--out", str(wrong)]}[command]
    t0 = time.perf_counter()
    err = _one_line_error(capsys, main(args))
    assert str(wrong) in err and time.perf_counter() - t0 < 5
    assert not no_load
    if wrong.is_file():
        assert wrong.read_text() == "keep me"


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked / "out"
    return Path("/proc/lensforge-no-such-dir/out")  # root can write anywhere but /proc


@pytest.mark.parametrize("case", ["under-a-file", "unwritable"])
@pytest.mark.parametrize("command", ["train", "run", "show"])
def test_unwritable_out_fails_before_work(ws, tmp_path, capsys, no_load, case, command):
    if case == "under-a-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    else:
        out = _unwritable(tmp_path)
    args = {"train": _train(ws, out),
            "run": ["run", "--model", str(ws["model"]), "--out", str(out)],
            "show": ["show", "text", "--model", str(ws["model"]), "--out", str(out)]}[command]
    err = _one_line_error(capsys, main(args))
    assert "--out" in err and not no_load


# ------------------------------------------------------------------ option values
@pytest.mark.parametrize("option", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--lr", "0"),
    ("--weight-decay", "nan"), ("--weight-decay", "-0.1"), ("--ridge", "-1"),
    ("--ridge", "nan"), ("--clip", "nan"), ("--clip", "-1"), ("--momentum", "nan"),
    ("--momentum", "1.5"), ("--warmup-steps", "-3"),
])
def test_bad_numbers_fail_before_the_model_loads(ws, tmp_path, capsys, no_load, option):
    err = _one_line_error(capsys, main(_train(ws, tmp_path / "o", *option)))
    assert option[0] in err and not no_load
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "nonsense", "mps"])
def test_unavailable_device_fails_before_the_model_loads(ws, tmp_path, capsys, no_load, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has the device")
    for args in (_train(ws, tmp_path / "o", "--device", device),
                 ["show", "text", "--model", str(ws["model"]), "--device", device,
                  "--out", str(tmp_path / "t.html")]):
        err = _one_line_error(capsys, main(args))
        assert "--device" in err
    assert not no_load


# ------------------------------------------------------------------ text encodings
def test_binary_file_is_refused_by_show_and_train_alike(ws, tmp_path, capsys, no_load):
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 64)
    err = _one_line_error(capsys, main(["show", "--file", str(blob), "--model", str(ws["model"]),
                                        "--out", str(tmp_path / "t.html")]))
    assert str(blob) in err and "text" in err
    err = _one_line_error(capsys, main(_train(ws, tmp_path / "o", "--data", str(blob))))
    assert str(blob) in err and "text" in err
    assert not no_load


def test_mostly_utf8_text_with_a_stray_byte_is_read_by_show(ws, tmp_path, capsys):
    text = tmp_path / "latin.txt"
    text.write_bytes(b"the cat runs over a lazy fox caf" + b"\xe9" + b" and sleeps\n")
    assert main(["show", "--file", str(text), "--model", str(ws["model"]), "--dtype", "float32",
                 "--out", str(tmp_path / "t.html")]) == 0
    assert (tmp_path / "t.html").stat().st_size > 0


# ------------------------------------------------------------------ model names
def test_unknown_model_name_fails_at_once_offline(tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    err = _one_line_error(capsys, main(["show", "hi", "--model", "nobody/no-such-model-xyz",
                                        "--out", str(tmp_path / "t.html")]))
    assert time.perf_counter() - t0 < 5
    assert "nobody/no-such-model-xyz" in err and "--online" in err
    assert not no_load


def test_model_in_the_local_hub_cache_loads_offline(ws, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from lensforge.models.loading import load_model, resolve_model_source

    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in ws["model"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    source, gguf = resolve_model_source("someone/tiny")
    assert Path(source) == snap and gguf is None
    adapter = load_model("someone/tiny", dtype="float32")
    assert adapter.n_layers == 3


def test_run_refuses_bad_numbers_before_loading(ws, tmp_path, capsys, no_load):
    err = _one_line_error(capsys, main(["run", "--model", str(ws["model"]), "--tokens", "-5",
                                        "--out", str(tmp_path / "o")]))
    assert "--tokens" in err and not no_load


def test_manifest_lists_what_lensforge_wrote(ws, tmp_path):
    out = tmp_path / "run"
    assert main(_train(ws, out)) == 0
    manifest = json.loads((out / ".lensforge-out.json").read_text())
    listed = set(manifest["files"])
    assert listed == set(_tree(out)) - {".lensforge-out.json"}
    assert manifest["complete"] is True


def test_files_outside_what_train_writes_are_left_alone(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(ws, out)) == 0
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")  # e.g. `eval --out run/eval`
    (out / "notes.txt").write_text("mine")
    assert main(_train(ws, out, "--overwrite")) == 0
    assert main(_train(ws, out, "--resume")) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "eval" / "metrics.json").read_text() == "{}"
    assert (out / "lenses" / "lora_r4" / "config.json").exists()


def test_a_killed_runs_files_count_as_its_own(ws, tmp_path, capsys):
    """SIGKILL leaves the manifest unfinished; files written after the start are the run's."""
    from lensforge.cli.outdir import MANIFEST, claim_out_dir

    out = tmp_path / "killed"
    claim_out_dir(out, command="train", scope=("checkpoint",))  # never finished
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.json").write_text("{}")
    old = out / "checkpoint" / "from_before.txt"
    old.write_text("mine")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # older than the run: a user's
    err = _one_line_error(capsys, main(_train(ws, out, "--resume")))
    assert "from_before.txt" in err and "state.json" not in err
    assert json.loads((out / MANIFEST).read_text())["complete"] is False


@pytest.mark.parametrize("command", ["eval", "show", "shortcuts"])
def test_broken_lens_fails_before_the_model_loads(ws, tmp_path, capsys, no_load, command):
    """A NaN lens (or one whose config and tensors disagree) is refused in one line before
    the model is loaded, for every command that takes lens folders."""
    import torch
    from safetensors.torch import load_file, save_file

    from lensforge.lenses import TunedLens, save_lens
    from lensforge.models.adapter import ModelAdapter
    from lensforge.models.loading import load_model as real_load

    adapter: ModelAdapter = real_load(str(ws["model"]), dtype="float32")
    lens_dir = save_lens(TunedLens.from_model(adapter), tmp_path / "nan")
    tensors = load_file(str(lens_dir / "lens.safetensors"))
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(lens_dir / "lens.safetensors"), metadata={"lens_type": "tuned"})
    spec = f"t={lens_dir}"
    argv = {"eval": ["eval", spec, "--out", str(tmp_path / "o")],
            "show": ["show", "a b c", "--lens", spec, "--out", str(tmp_path / "s.html")],
            "shortcuts": ["shortcuts", spec, "--out", str(tmp_path / "sc")]}[command]
    code = main([*argv, "--model", str(ws["model"]), "--dtype", "float32"])
    err = _one_line_error(capsys, code)
    assert "nan" in err.lower() or "inf" in err.lower()
    assert no_load == []
