"""Atomic writes: a killed process never leaves a half-written lens, checkpoint or report.

A folder is written into a temporary sibling `.NAME.tmp-PID-HOST-RAND`, fsynced, then swapped
in with two renames (old -> `.NAME.old-PID-HOST-RAND`, new -> NAME). A kill leaves at most
those siblings behind; the PID and HOST in their names let the next run tell a dead writer's
leftovers (removed, or restored when NAME itself is missing) from a live writer's (untouched).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from lensforge.errors import CheckpointError

# The steps of atomic_dir, in order; `on_step(name)` is called after each (tests kill there).
STEPS = ("tmp-created", "files-written", "fsynced", "old-moved", "new-moved", "trash-removed")
OnStep = Callable[[str], None] | None

# What follows `.NAME.tmp-` / `.NAME.old-`: PID, then HOST and a random tag (absent in the
# `.NAME.old-PID` names of lensforge <= 0.x, which are read as this host's).
_SUFFIX = re.compile(r"(\d+)(?:-([A-Za-z0-9_]+)-([a-z0-9_]+))?")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _tag() -> str:
    return f"{os.getpid()}-{_host()}-{secrets.token_hex(4)}"


def _alive(pid: int, host: str | None) -> bool:
    """Whether a writer may still hold a sibling; when in doubt, say yes (it is kept)."""
    if os.name != "posix" or (host is not None and host != _host()):
        return True  # another machine's pid (shared disk), or no safe liveness probe
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _siblings(target: Path) -> dict[str, list[tuple[Path, bool]]]:
    """lensforge's own temp/trash siblings of `target`: {"tmp"|"old": [(path, held), ...]}."""
    found: dict[str, list[tuple[Path, bool]]] = {"tmp": [], "old": []}
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return found
    for path in entries:
        for kind in found:
            prefix = f".{target.name}.{kind}-"
            if path.name.startswith(prefix):
                m = _SUFFIX.fullmatch(path.name[len(prefix):])
                if m:
                    found[kind].append((path, _alive(int(m.group(1)), m.group(2))))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def recover_dir(target: str | os.PathLike) -> Path | None:
    """Repair `target` after a killed atomic write; return it, or None if nothing is there.

    If `target` is missing but a dead writer left its old copy mid-swap, that copy is
    renamed back. Temp folders of dead writers are removed, and so are old copies once
    `target` exists. A live writer's siblings are never touched: if one is mid-swap, this
    raises CheckpointError asking to retry.
    """
    target = Path(target)
    found = _siblings(target)
    if not target.exists():
        live = [p for p, held in found["old"] if held]
        if live:
            raise CheckpointError(
                f"{target} is being replaced by another lensforge process right now ({live[0].name}"
                "); retry when it has finished"
            )
        olds = sorted((p for p, _ in found["old"]), key=lambda p: p.stat().st_mtime)
        if olds:
            try:
                os.replace(olds[-1], target)
            except OSError as exc:
                if not target.exists():  # another process may have restored it first
                    raise CheckpointError(
                        f"{target} was left mid-write; could not restore {olds[-1].name}: {exc}; "
                        f"rename {olds[-1]} to {target} by hand"
                    ) from exc
    for path, held in found["tmp"] + found["old"]:
        if not held and path.exists() and (path.name.startswith(f".{target.name}.tmp-")
                                           or target.exists()):
            _remove(path)
    return target if target.exists() else None


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. directories cannot be opened on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data files are synced
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # children before their folder
        if not path.is_symlink():
            _fsync(path)
    _fsync(root)


def _make_tmp_dir(target: Path) -> Path:
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{_tag()}")
        try:
            tmp.mkdir(0o777)  # umask applies, as for any folder the user creates
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, on_step: OnStep = None) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target`.

    The swap is two renames (old -> trash, new -> target), so at every instant either the
    old or the new complete folder exists under `target` or its trash name; recover_dir
    (run first, here and by readers) restores or removes what a kill left. `on_step` is
    called with each name in STEPS as it completes (for crash tests).
    """
    step = on_step or (lambda _name: None)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = _make_tmp_dir(target)
    trash = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    moved_old = False
    try:
        step("tmp-created")
        yield tmp
        step("files-written")
        _fsync_tree(tmp)
        step("fsynced")
        if target.exists():
            os.replace(target, trash)
            moved_old = True
        step("old-moved")
        os.replace(tmp, target)
        _fsync(target.parent)
        step("new-moved")
        shutil.rmtree(trash, ignore_errors=True)
        step("trash-removed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and trash.exists():
            if target.exists():
                shutil.rmtree(trash, ignore_errors=True)  # the new copy made it in
            else:
                os.replace(trash, target)  # roll back to the old copy
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      on_step: OnStep = None) -> Path:
    """Write one file atomically (temp sibling, fsync, rename); returns `path`.

    Steps: "tmp-created", "files-written", "fsynced", "new-moved". A kill at any of them
    leaves the old or the new complete file; the temp file is removed by the next write.
    """
    step = on_step or (lambda _name: None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)  # removes dead writers' temp files
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{_tag()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        step("tmp-created")
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            fh.write(text)
            step("files-written")
            fh.flush()
            os.fsync(fh.fileno())
        step("fsynced")
        os.replace(tmp, path)
        _fsync(path.parent)
        step("new-moved")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
