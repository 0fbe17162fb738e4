"""General text for lenses of chat models: AlpacaEval's instructions with their reference
replies, and a mix of them with the built-in Python corpus.

A lens trained only on Python documentation reads "Python" and "function" into every
sentence; mixing in varied instructions and replies (cooking, history, poems, email)
gives a lens that reads ordinary English too. Sources:

    alpaca, alpaca:train, alpaca:heldout     instruction + reply, as one document each
    general, general:train, general:heldout  stdlib and alpaca, interleaved ~1:1 by text size

The held-out split is every 8th AlpacaEval record (about 100 of 805), never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from lensforge.errors import DataError

ALPACA_SOURCES = ("alpaca", "alpaca:train", "alpaca:heldout")
GENERAL_SOURCES = ("general", "general:train", "general:heldout")
HELDOUT_EVERY = 8


def _split_of(name: str, split: str) -> str:
    chosen = name.split(":", 1)[1] if ":" in name else split
    if chosen not in ("train", "heldout"):
        raise DataError(f"split must be 'train' or 'heldout', got '{chosen}'")
    return chosen


def alpaca_documents(split: str = "train") -> Iterator[str]:
    """Yield "instruction\\n\\nreply" documents of AlpacaEval's 805 records (see
    `lensforge.data.instructions` for where the file comes from)."""
    from lensforge.data.instructions import DEFAULT_CACHE, alpaca_instructions

    alpaca_instructions()  # fetches and caches outputs.json, or warns and falls back
    path = DEFAULT_CACHE.expanduser()
    if not path.exists():
        raise DataError("AlpacaEval's outputs.json is not available offline; run once with "
                        "PyPI reachable, or use --data stdlib")
    records = json.loads(path.read_text())
    for i, record in enumerate(records):
        held = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
        if held != (split == "heldout"):
            continue
        text = f"{record.get('instruction', '')}\n\n{record.get('output', '')}".strip()
        if text:
            yield text


def general_documents(split: str = "train") -> Iterator[str]:
    """Interleave stdlib and AlpacaEval documents so each has emitted about as many
    characters as the other (alpaca records are short; stdlib modules long)."""
    from lensforge.data.stdlib_corpus import stdlib_documents

    sources = [stdlib_documents(split), alpaca_documents(split)]
    emitted = [0, 0]
    alive = [True, True]
    while any(alive):
        i = min((j for j in (0, 1) if alive[j]), key=lambda j: emitted[j])
        doc = next(sources[i], None)
        if doc is None:
            alive[i] = False
            continue
        emitted[i] += len(doc)
        yield doc


def builtin_documents(name: str, split: str) -> Iterator[str]:
    """Documents of a built-in general-text source name (see module docstring)."""
    if name in ALPACA_SOURCES:
        return alpaca_documents(_split_of(name, split))
    return general_documents(_split_of(name, split))
