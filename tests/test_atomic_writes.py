"""Every atomic write (lens, checkpoint, report) survives a crash at each of its steps.

The steps come from `on_step` hooks of lensforge.storage (no environment variable in
production code). In-process tests raise from the hook; the crash tests SIGKILL a forked
child at each step, then check that the next run finds the old or the new complete copy,
and that it removes the dead writer's temp/trash siblings (and only those).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lensforge.errors import CheckpointError
from lensforge.lenses import load_lens
from lensforge.storage import STEPS, _host, atomic_dir, atomic_write_text, recover_dir

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

FILE_STEPS = ("tmp-created", "files-written", "fsynced", "new-moved")


def _tree(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_version(target: Path, version: int, on_step=None) -> None:  # noqa: ANN001
    with atomic_dir(target, on_step=on_step) as tmp:
        (tmp / "a.txt").write_text(f"a{version}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(f"b{version}" * version)


class _Crash(Exception):
    pass


def _raise_at(step: str):  # noqa: ANN202
    def hook(name: str) -> None:
        if name == step:
            raise _Crash(step)
    return hook


# ------------------------------------------------------------ in-process failures
@pytest.mark.parametrize("step", STEPS)
def test_failure_at_each_step_leaves_a_complete_folder_and_no_leftovers(
    tmp_path: Path, step: str
) -> None:
    target = tmp_path / "out"
    _write_version(target, 1)
    with pytest.raises(_Crash):
        _write_version(target, 2, on_step=_raise_at(step))
    done = STEPS.index(step) >= STEPS.index("new-moved")
    assert _tree(target) == {"a.txt": f"a{2 if done else 1}".encode(),
                             "sub/b.txt": (f"b{2 if done else 1}" * (2 if done else 1)).encode()}
    assert _siblings(target) == []


@pytest.mark.parametrize("step", FILE_STEPS)
def test_failed_file_write_keeps_old_file_and_no_leftovers(tmp_path: Path, step: str) -> None:
    path = tmp_path / "report.html"
    atomic_write_text(path, "old")
    with pytest.raises(_Crash):
        atomic_write_text(path, "new", on_step=_raise_at(step))
    assert path.read_text() == ("new" if step == "new-moved" else "old")
    assert _siblings(path) == []


def test_steps_are_reported_in_order(tmp_path: Path) -> None:
    seen: list[str] = []
    _write_version(tmp_path / "x", 1)
    _write_version(tmp_path / "x", 2, on_step=seen.append)
    assert tuple(seen) == STEPS
    seen.clear()
    atomic_write_text(tmp_path / "r.html", "x", on_step=seen.append)
    assert tuple(seen) == FILE_STEPS


def test_temp_names_carry_pid_and_host_and_modes_follow_umask(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "x") as tmp:
        assert tmp.name.startswith(f".x.tmp-{os.getpid()}-{_host()}-")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o777 & ~umask
    assert atomic_write_text(tmp_path / "r", "x").stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------- stale siblings
def test_only_dead_writers_own_siblings_are_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    _write_version(target, 1)
    dead, host = _dead_pid(), _host()
    stale = [f".ckpt.tmp-{dead}-{host}-ab12", f".ckpt.old-{dead}-{host}-cd34", f".ckpt.old-{dead}"]
    kept = [
        f".ckpt.tmp-{os.getpid()}-{host}-ef56",  # a live writer (this process)
        f".ckpt.tmp-{dead}-otherhost-ab12",  # another machine's pid: cannot tell, kept
        f".other.tmp-{dead}-{host}-ab12",  # another target
        ".ckpt.tmp-notes",  # not a lensforge name
        f"ckpt.tmp-{dead}-{host}-ab12",  # not hidden: the user's
    ]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / f".ckpt.tmp-{dead}-{host}-9999").write_text("a dead writer's temp file")
    _write_version(target, 2)  # the next write cleans up
    assert _siblings(target) == sorted(kept)
    assert _tree(target)["a.txt"] == b"a2"


def test_recover_dir_restores_newest_dead_old_copy(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    dead, host = _dead_pid(), _host()
    for i, name in enumerate([f".ckpt.old-{dead}-{host}-aaaa", f".ckpt.old-{dead}-{host}-bbbb"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "step").write_text(str(i))
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert recover_dir(target) == target
    assert (target / "step").read_text() == "1"
    assert _siblings(target) == []
    assert recover_dir(tmp_path / "nothing") is None


def test_recover_dir_refuses_while_a_live_writer_is_mid_swap(tmp_path: Path) -> None:
    held = tmp_path / f".ckpt.old-{os.getpid()}-{_host()}-aaaa"
    held.mkdir()
    with pytest.raises(CheckpointError, match="retry"):
        recover_dir(tmp_path / "ckpt")
    assert held.is_dir() and not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------ kill -9 at each step
_CHILD = r'''
import functools, json, os, signal, sys, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
from lensforge import storage
from lensforge.lenses import LensConfig, TunedLens, save_lens
from lensforge.lenses import io as lens_io
from lensforge.training import loop
from lensforge.viz import report

root = Path(sys.argv[1])

def lens(v):
    lens = TunedLens(LensConfig(lens_type="tuned", n_layers=2, hidden_size=8, model_id="t"))
    with torch.no_grad():
        lens.weight.copy_(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(v)))
    return lens

class Cfg:
    def to_dict(self):
        return {"steps": 10}

class Stream:
    def __init__(self, v):
        self.v = v
    def state_dict(self):
        return {"docs": self.v}

def write_lens(v, target):
    save_lens(lens(v), target)

def write_checkpoint(v, target):
    l = lens(v)
    opt = torch.optim.SGD(l.parameters(), lr=0.1, momentum=0.9)
    l.weight.sum().backward()
    opt.step()
    loop._save_checkpoint(target, Cfg(), {"tuned": l}, opt, Stream(v), v, [{"step": v}], {})

def write_report(v, target):
    run = root / f"run{v}"
    run.mkdir(exist_ok=True)
    (run / "summary.json").write_text(json.dumps({"model": {"model_id": f"m{v}"}}))
    report.write_run_report(run, out=target, samples=0)

KINDS = {  # writer, the module attribute holding its atomic writer, target name
    "lens": (write_lens, lens_io, "atomic_dir", "lens"),
    "checkpoint": (write_checkpoint, loop, "atomic_dir", "checkpoint"),
    "report": (write_report, report, "atomic_write_text", "report.html"),
}
results = []
for kind, steps in json.loads(sys.argv[2]).items():
    write, module, attr, name = KINDS[kind]
    for v in (1, 2):
        write(v, root / kind / f"ref{v}" / name)
    for step in steps:
        target = root / kind / step / name
        write(1, target)
        pid = os.fork()
        if pid == 0:
            try:
                def hook(s, step=step):
                    if s == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                setattr(module, attr, functools.partial(getattr(storage, attr), on_step=hook))
                write(2, target)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        results.append([kind, step, os.waitstatus_to_exitcode(status)])
print(json.dumps(results))
'''

_KINDS = {"lens": ("lens", STEPS), "checkpoint": ("checkpoint", STEPS),
          "report": ("report.html", FILE_STEPS)}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Run every (writer, step) crash once: a child killed by SIGKILL mid-write."""
    root = tmp_path_factory.mktemp("crash")
    script = root / "child.py"
    script.write_text(_CHILD)
    steps = {kind: list(s) for kind, (_, s) in _KINDS.items()}
    proc = subprocess.run([sys.executable, str(script), str(root), json.dumps(steps)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = {(k, s): c for k, s, c in json.loads(proc.stdout.strip().splitlines()[-1])}
    return root, codes


@pytest.mark.integration
@pytest.mark.parametrize("kind,step", [(k, s) for k, (_, steps) in _KINDS.items() for s in steps])
def test_kill_at_each_step_then_next_run_finds_old_or_new(crashed: tuple[Path, dict],
                                                          kind: str, step: str) -> None:
    root, codes = crashed
    name, steps = _KINDS[kind]
    assert codes[(kind, step)] == -9, "the writer was not killed mid-write"
    target = root / kind / step / name
    done = steps.index(step) >= steps.index("new-moved")
    if step not in ("trash-removed", "new-moved" if kind == "report" else None):
        assert _siblings(target), "a kill mid-write should leave a sibling behind"
    # the next run
    if kind == "lens":
        lens = load_lens(target)
        assert torch.equal(lens.weight, load_lens(root / kind / f"ref{2 if done else 1}" /
                                                  name).weight)
    elif kind == "checkpoint":
        assert recover_dir(target) == target
        load_lens(target / "lenses" / "tuned")  # what resume reads first
    else:  # a report is read as is; the next write of it first runs recover_dir
        recover_dir(target)
    expected = root / kind / f"ref{2 if done else 1}" / name
    assert _tree(target) == _tree(expected), f"{kind} after a kill at {step} is not a " \
                                             "complete old or new copy"
    assert _siblings(target) == [], "the dead writer's siblings were not cleaned"


@pytest.mark.integration
def test_checkpoint_after_kill_mid_swap_resumes_from_old_step(crashed: tuple[Path, dict]) -> None:
    root, _ = crashed
    target = root / "checkpoint" / "old-moved" / "checkpoint"
    recover_dir(target)
    assert json.loads((target / "state.json").read_text())["step"] == 1
    state = torch.load(target / "optimizer.pt", weights_only=True)
    assert state["state"], "optimizer momentum survives the recovery"

