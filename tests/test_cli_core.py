"""The CLI as a user runs it: train, eval, resume after kill -9, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_folder import make_tiny_model_dir, write_corpus

from lensforge.cli.main import main

pytestmark = pytest.mark.integration  # lensforge as a user runs it

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "cli_launcher.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    model = make_tiny_model_dir(base / "model")
    other = make_tiny_model_dir(base / "other", seed=7)
    corpus = write_corpus(base / "corpus.txt", n_docs=120)
    return {"base": base, "model": model, "other": other, "corpus": corpus}


def _train_args(ws, out, *extra):
    return ["train", "--model", str(ws["model"]), "--dtype", "float32", "--data",
            str(ws["corpus"]), "--seq-len", "16", "--batch-size", "2", "--rank", "4",
            "--lens", "lowrank", "tuned", "--init-tokens", "64", "--tokens", "640",
            "--tokens-per-step", "64", "--lr", "0.01", "--checkpoint-every", "1",
            "--no-progress", "--out", str(out), *extra]


def _run_cli(args, *, step_sleep: float = 0.0):
    """The CLI in a child process; `step_sleep` s after each step lets a kill land mid-run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(LAUNCHER), "--sleep", str(step_sleep), "--", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_train_then_eval_writes_results(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(workspace, out)) == 0
    lens_dir = out / "lenses" / "lora_r4"
    cfg = json.loads((lens_dir / "config.json").read_text())
    assert cfg["lens_type"] == "lowrank" and cfg["rank"] == 4 and cfg["unembed_hash"]
    assert main(["eval", f"lora={lens_dir}", f"tuned={out / 'lenses' / 'tuned'}", "--model",
                 str(workspace["model"]), "--dtype", "float32", "--data",
                 str(workspace["corpus"]), "--seq-len", "16", "--batch-size", "2",
                 "--tokens", "128", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"logit", "lora", "tuned"}
    assert len(metrics["lora"]["kl"]) == 3
    assert (tmp_path / "eval" / "layers.png").stat().st_size > 10_000
    raf = json.loads((tmp_path / "eval" / "raf.json").read_text())
    assert raf["reference"] == "tuned" and "lora" in raf["raf"]
    assert "mean KL" in capsys.readouterr().out


def test_kill_minus_9_then_resume_matches_uninterrupted(workspace, tmp_path):
    straight = tmp_path / "straight"
    assert main(_train_args(workspace, straight)) == 0

    killed = tmp_path / "killed"
    proc = _run_cli(_train_args(workspace, killed), step_sleep=0.5)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["step"] >= 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = json.loads(state.read_text())["step"]
    assert 3 <= step_at_kill < 10, "the kill must land mid-run"
    assert not (killed / "lenses").exists()

    assert main(_train_args(workspace, killed, "--resume")) == 0
    for name in ("lora_r4", "tuned"):
        a = load_file(str(straight / "lenses" / name / "lens.safetensors"))
        b = load_file(str(killed / "lenses" / name / "lens.safetensors"))
        for key in a:
            assert (a[key] - b[key]).abs().max() < 1e-6, (name, key)


@pytest.mark.parametrize(
    "case",
    ["missing-data", "empty-data", "rank-too-big", "wrong-lens", "missing-model", "bad-lens-dir"],
)
def test_bad_inputs_give_one_line_errors(workspace, tmp_path, capsys, case):
    ws = workspace
    if case == "missing-data":
        args = _train_args(ws, tmp_path / "o")
        args[args.index("--data") + 1] = str(tmp_path / "nope.txt")
    elif case == "empty-data":
        (tmp_path / "empty.txt").write_text("")
        args = _train_args(ws, tmp_path / "o")
        args[args.index("--data") + 1] = str(tmp_path / "empty.txt")
    elif case == "rank-too-big":
        args = _train_args(ws, tmp_path / "o")
        args[args.index("--rank") + 1] = "999"
    elif case == "missing-model":
        args = _train_args(ws, tmp_path / "o")
        args[args.index("--model") + 1] = str(tmp_path / "no_model")
    else:
        out = tmp_path / "lens_run"
        if case == "wrong-lens":
            assert main(_train_args(ws, out, "--tokens", "0")) == 0
            lens = out / "lenses" / "lora_r4"
        else:
            lens = tmp_path / "garbage"
            lens.mkdir()
            (lens / "config.json").write_text("{not json")
        capsys.readouterr()
        args = ["eval", str(lens), "--model", str(ws["other"]), "--dtype", "float32",
                "--data", str(ws["corpus"]), "--seq-len", "16", "--out", str(tmp_path / "e")]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err


def test_help_lists_defaults():
    proc = subprocess.run([sys.executable, "-m", "lensforge", "train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert "default: 32" in proc.stdout and "--resume" in proc.stdout
