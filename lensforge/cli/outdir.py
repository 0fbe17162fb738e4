"""Output folders that lensforge owns: it never deletes or overwrites a file it did not write.

A command that replaces whole sub-folders of its --out (train, run) claims the folder before
any work: it writes MANIFEST there, and when it stops (normally or by an exception) lists in
it every file it wrote. A later command into the same folder is refused if the folder holds
files the manifest does not list (a user's), and needs --resume or --overwrite if it holds a
previous run. --overwrite deletes only the listed files.

A command may declare the top-level names it writes (`scope`, e.g. train: checkpoint, lenses,
train_history.json, and their hidden `.NAME.*` siblings); files elsewhere in the folder are
then neither refused nor touched, so `eval --out RUN/eval` next to a training run is fine.

A run killed with SIGKILL never lists its files; its manifest stays "complete": false with the
time it started, and files written since then count as its own.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lensforge.errors import CheckpointError, ConfigError
from lensforge.training.distributed import launch_rank

MANIFEST = ".lensforge-out.json"
FORMAT = "lensforge.out/1"
# File timestamps come from a coarser clock than time.time(); allow for it.
_CLOCK_SLACK_S = 2.0
_NAMED = 5  # files named in an error message


@dataclass
class OutClaim:
    """A claimed output folder; call finish() when the command stops (in a finally)."""

    folder: Path
    command: str
    started: float
    previous: frozenset[str]  # files of earlier runs kept (on --resume)
    scope: tuple[str, ...] | None = None  # top-level names the command writes; None: all
    active: bool = True  # False on torchrun ranks other than 0: rank 0 keeps the manifest

    def finish(self) -> None:
        """List the files this run wrote (it stopped, normally or by an exception)."""
        if not self.active or not self.folder.is_dir():
            return
        since = self.started - _CLOCK_SLACK_S
        files = {f for f, mtime in _scan(self.folder, self.scope).items()
                 if f in self.previous or mtime >= since}
        _write_manifest(self.folder, {"format": FORMAT, "command": self.command,
                                      "complete": True, "started": self.started,
                                      "files": sorted(files)})


def claim_out_dir(out: str | os.PathLike[str], *, command: str, overwrite: bool = False,
                  resume: bool = False, scope: tuple[str, ...] | None = None) -> OutClaim:
    """Check and claim ``out`` for ``command`` (see the module docstring); ConfigError if a
    user's files are there, or a previous run without --overwrite / --resume."""
    folder = Path(out)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other; pick one")
    active = launch_rank() == 0  # under torchrun, rank 0 alone writes the folder
    if folder.is_dir():
        ours = _check_existing(folder, scope, overwrite=overwrite, resume=resume)
    else:
        ours = set()
    if not active:
        return OutClaim(folder, command, time.time(), frozenset(ours), scope, active=False)
    if overwrite:
        _delete(folder, ours)
        ours = set()
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _write_manifest(folder, {"format": FORMAT, "command": command, "complete": False,
                             "started": started, "files": sorted(ours)})
    return OutClaim(folder, command, started, frozenset(ours), scope)


def _check_existing(folder: Path, scope: tuple[str, ...] | None, *, overwrite: bool,
                    resume: bool) -> set[str]:
    """The files of earlier lensforge runs in ``folder``; raises if any file is not one."""
    files = _scan(folder, scope)
    manifest = _read_manifest(folder)
    ours: set[str] = set()
    if manifest is not None:
        listed = set(manifest.get("files", []))
        since = float(manifest.get("started", 0)) - _CLOCK_SLACK_S
        killed = not manifest.get("complete", False)
        ours = {f for f, mtime in files.items() if f in listed or (killed and mtime >= since)}
    foreign = sorted(set(files) - ours)
    if foreign:
        named = ", ".join(foreign[:_NAMED])
        more = f" and {len(foreign) - _NAMED} more" if len(foreign) > _NAMED else ""
        raise ConfigError(
            f"--out {folder} holds files lensforge did not write ({named}{more}); lensforge "
            "never overwrites or deletes them: move them away or choose another --out"
        )
    if ours and not (overwrite or resume):
        previous = manifest.get("command", "lensforge") if manifest else "lensforge"
        raise ConfigError(
            f"--out {folder} holds a previous {previous} run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    return ours


def _in_scope(name: str, scope: tuple[str, ...] | None) -> bool:
    """Whether a top-level ``name`` is one the command writes (or a hidden sibling of one)."""
    return scope is None or any(name == s or name.startswith(f".{s}.") for s in scope)


def _scan(folder: Path, scope: tuple[str, ...] | None = None) -> dict[str, float]:
    """{relative path: mtime} of the files under ``folder`` (hidden ones included) within
    ``scope``, without the manifest and sub-folders holding their own (another output)."""
    found: dict[str, float] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        top = here == folder
        dirnames[:] = [d for d in dirnames if not (here / d / MANIFEST).exists()
                       and (not top or _in_scope(d, scope))]
        for name in filenames:
            if top and not _in_scope(name, scope):
                continue
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if not rel.startswith(MANIFEST):  # the manifest and its temporary copy
                found[rel] = path.lstat().st_mtime
    return found


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); lensforge will not guess which "
                              "files it wrote there: choose another --out") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lensforge output manifest; choose another --out")
    return data


def _write_manifest(folder: Path, data: dict) -> None:
    tmp = folder / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def _delete(folder: Path, files: set[str]) -> None:
    """Delete ``files`` (ours), then the folders they leave empty."""
    parents: set[Path] = set()
    for rel in files:
        path = folder / rel
        path.unlink(missing_ok=True)
        parents.update(p for p in path.parents if p != folder and folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
