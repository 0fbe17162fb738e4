"""The default corpus: the Python standard library's own documentation and source.

It is on every machine that runs lensforge, needs no download and no licence check, and mixes
English prose (the ``pydoc`` topic pages, docstrings, comments) with code. The document list and
the train / held-out split are deterministic: the same interpreter gives the same documents in
the same order on every run (a different Python version gives a different corpus).

Size on CPython 3.11: 752 documents, ~11.1 M characters (~10.6 M in train, ~2.5-3.5 M
tokens with a typical BPE vocabulary) -- enough for short runs, not for a 2^27-token budget.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lensforge.errors import ConfigError

HELDOUT_PER_10000 = 500  # ~5 % of documents are held out
SPLITS = ("train", "heldout")

# Test suites are huge, repetitive and full of fixtures; idlelib is a GUI app; topics.py would
# duplicate the pydoc topics we already include; site-packages is not the standard library.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"}
)
_SKIP_FILES = frozenset({"pydoc_data/topics.py"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_document_names() -> list[str]:
    """All document names, sorted: ``topic:<name>`` for pydoc topics, ``module:<relpath>``."""
    from pydoc_data.topics import topics

    names = [f"topic:{key}" for key in sorted(topics)]
    root = stdlib_root()
    modules: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in filenames:
            if filename.endswith(".py"):
                rel = (Path(dirpath) / filename).relative_to(root).as_posix()
                if rel not in _SKIP_FILES:
                    modules.append(f"module:{rel}")
    return names + sorted(modules)


def is_heldout(name: str) -> bool:
    """Stable split: sha256 of the name, not ``hash()`` (salted per process)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < HELDOUT_PER_10000


def split_names(split: str) -> list[str]:
    """Document names in ``split`` ("train" or "heldout"), in corpus order."""
    if split not in SPLITS:
        raise ConfigError(f"unknown stdlib split {split!r}; use one of {SPLITS}")
    want_heldout = split == "heldout"
    return [name for name in stdlib_document_names() if is_heldout(name) == want_heldout]


def read_stdlib_document(name: str) -> str:
    """Text of one document by name (as listed by ``stdlib_document_names``)."""
    kind, _, key = name.partition(":")
    if kind == "topic":
        from pydoc_data.topics import topics

        return topics[key]
    if kind == "module":
        # Bytes + replace: a few stdlib files carry latin-1 coding cookies; never crash on them.
        return (stdlib_root() / key).read_bytes().decode("utf-8", errors="replace")
    raise KeyError(name)


def stdlib_documents(split: str = "train") -> Iterator[str]:
    """Yield the documents of ``split`` ("train" or "heldout"), read lazily, in a fixed order."""
    for name in split_names(split):
        text = read_stdlib_document(name)
        if text.strip():
            yield text
