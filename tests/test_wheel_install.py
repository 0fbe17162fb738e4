"""The wheel as a user installs it: build it, install it into a fresh venv with no checkout
importable, and run the `lensforge` console script (--help, a tiny train, eval, export).

The fresh venv gets the wheel with --no-deps; its dependencies (torch, transformers, ...)
come from the dev venv through a .pth line naming the dev venv's site-packages. Such a line
only appends the folder to sys.path: the .pth files inside it (the dev venv's editable
lensforge hook among them) are not run, so `import lensforge` can only find the wheel's copy,
which the test asserts. Everything runs from a temporary cwd, away from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from tiny_folder import make_tiny_model_dir, write_corpus

pytestmark = pytest.mark.slow  # builds a wheel and a venv, then trains: ~30-60 s

ROOT = Path(__file__).resolve().parent.parent
# What a wheel build reads from the checkout (the readme is the long description).
SOURCES = ("pyproject.toml", "README.md", "lensforge")


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build would write build/ and *.egg-info into the checkout.
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = base / "dist"
    # --no-build-isolation --no-index: no network; the dev venv's setuptools builds it
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-w", dist, src], cwd=base)
    # setuptools warns (on stderr, even without -v) about a deprecated `license` table
    assert "project.license" not in build.stderr, build.stderr
    (wheel,) = dist.glob("lensforge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
    assert "License-Expression: MIT" in metadata.decode(), metadata[:400]

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "-q", wheel], cwd=base)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=base).stdout.strip())
    (site / "lensforge_test_dev_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cwd = base / "cwd"  # nothing importable here
    cwd.mkdir()
    # The tiny model is made by the dev venv (this process); the wheel only runs on it.
    model = make_tiny_model_dir(base / "model")
    corpus = write_corpus(base / "corpus.txt", n_docs=80)
    return {"venv": venv, "python": python, "lensforge": venv / "bin" / "lensforge",
            "env": env, "cwd": cwd, "model": model, "corpus": corpus}


def test_lensforge_is_imported_from_the_wheel(installed):
    proc = _run([installed["python"], "-c",
                 "import json, lensforge; from importlib.resources import files; "
                 "assets = files('lensforge.viz') / 'assets'; "
                 "print(json.dumps({'file': lensforge.__file__, "
                 "'assets': sorted(p.name for p in assets.iterdir())}))"],
                cwd=installed["cwd"], env=installed["env"])
    info = json.loads(proc.stdout)
    where = Path(info["file"]).resolve()
    assert installed["venv"].resolve() in where.parents, where
    assert ROOT not in where.parents
    assert any(name.endswith(".js") for name in info["assets"]), info  # package data shipped


def test_console_script_help(installed):
    proc = _run([installed["lensforge"], "--help"], cwd=installed["cwd"], env=installed["env"])
    for command in ("train", "eval", "export", "import"):
        assert command in proc.stdout, proc.stdout


def test_console_script_trains_evaluates_and_exports(installed, tmp_path):
    ws, lf = installed, installed["lensforge"]
    common = ["--model", ws["model"], "--dtype", "float32", "--data", ws["corpus"],
              "--seq-len", "16", "--batch-size", "2"]
    run = tmp_path / "run"
    _run([lf, "train", *common, "--lens", "lowrank", "--rank", "4", "--init-tokens", "64",
          "--tokens", "128", "--tokens-per-step", "32", "--no-progress", "--out", run],
         cwd=ws["cwd"], env=ws["env"])
    lens = run / "lenses" / "lora_r4"
    assert json.loads((lens / "config.json").read_text())["lens_type"] == "lowrank"
    _run([lf, "eval", f"lora={lens}", *common, "--tokens", "64", "--out", tmp_path / "eval"],
         cwd=ws["cwd"], env=ws["env"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"logit", "lora"} <= set(metrics) and len(metrics["lora"]["kl"]) == 3
    _run([lf, "export", lens, "--format", "tuned-lens", tmp_path / "tl"],
         cwd=ws["cwd"], env=ws["env"])
    assert (tmp_path / "tl" / "params.pt").is_file()
