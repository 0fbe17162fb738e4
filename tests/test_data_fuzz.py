"""Fuzzing the data loaders: whatever a file holds, reading it ends in a document stream or a
LensforgeError (one line for the CLI), never another exception, and never changes the file."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lensforge.data.sources import (
    MAX_JSONL_LINE_CHARS,
    check_source,
    iter_documents,
    read_text_file,
)
from lensforge.errors import DataError, LensforgeError

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

SEED = 1234
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 日本語 text.\n"


def _valid_files(folder: Path, rng: random.Random) -> dict[str, bytes]:
    """One well-formed file of each format (bytes by suffix)."""
    docs = [TEXT * rng.randint(1, 20) for _ in range(40)]
    jsonl = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    pq.write_table(pa.table({"text": docs}), folder / "seed.parquet", row_group_size=8)
    return {
        ".txt": "\n\n".join(docs).encode(),
        ".jsonl": jsonl.encode(),
        ".txt.gz": gzip.compress("\n\n".join(docs).encode(), mtime=0),
        ".jsonl.gz": gzip.compress(jsonl.encode(), mtime=0),
        ".parquet": (folder / "seed.parquet").read_bytes(),
    }


def _mutations(valid: dict[str, bytes], rng: random.Random) -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    for suffix, data in valid.items():
        cases.append((suffix, b""))  # empty
        cases.append((suffix, data))  # intact
        for _ in range(4):
            cases.append((suffix, rng.randbytes(rng.randint(1, 5000))))  # random bytes
            cases.append((suffix, data[: rng.randint(1, len(data) - 1)]))  # truncated
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            cases.append((suffix, bytes(flipped)))  # corrupted
    for encoding in ("latin-1", "cp1252", "utf-16", "utf-8-sig", "shift_jis", "koi8-r"):
        text = TEXT.encode(encoding, errors="replace") * 30
        cases.append((".txt", text))
        cases.append((".jsonl", json.dumps({"text": "x"}).encode() + b"\n" + b'{"text": "'
                      + text.replace(b'"', b"").replace(b"\\", b"").replace(b"\n", b" ")
                      + b'"}\n'))
    mixed = b"".join(TEXT.encode(rng.choice(["utf-8", "latin-1", "utf-16"]), errors="replace")
                     for _ in range(50))
    cases.append((".txt", mixed))
    cases.append((".txt", b"\x00" * 10_000))
    cases.append((".jsonl", b"[" * 100_000 + b"\n"))  # nests deeper than the recursion limit
    cases.append((".jsonl", b'{"text": ' + b"9" * 10_000 + b"}\n"))  # int over the digit limit
    cases.append((".jsonl", b'{"text": {"nested": 1}}\n["a list"]\n'))
    return cases


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_all(path: Path) -> int:
    """Characters read; only LensforgeError may escape (checked by the caller)."""
    check_source(path)
    return sum(len(doc) for doc in iter_documents(path))


def test_fuzzed_files_end_in_documents_or_a_lensforge_error(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    cases = _mutations(_valid_files(tmp_path, rng), rng)
    outcomes = {"ok": 0, "error": 0}
    for i, (suffix, data) in enumerate(cases):
        path = tmp_path / f"case{i:03d}{suffix}"
        path.write_bytes(data)
        before = _digest(path)
        try:
            _read_all(path)
            outcomes["ok"] += 1
        except LensforgeError as exc:
            assert "\n" not in str(exc), exc  # one line for the CLI
            outcomes["error"] += 1
        assert _digest(path) == before, f"case {i} changed its input file"
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 20, outcomes


def test_a_folder_of_fuzzed_files_fails_cleanly(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, (suffix, data) in enumerate(_mutations(_valid_files(tmp_path, rng), rng)[:30]):
        (folder / f"f{i:02d}{suffix}").write_bytes(data)
    with pytest.raises(LensforgeError):
        _read_all(folder)


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_mostly_text_with_stray_bytes_is_read_with_replacements(tmp_path, encoding) -> None:
    """The documented policy: a few undecodable bytes become U+FFFD, the rest is kept."""
    path = tmp_path / "a.txt"
    path.write_bytes(("plain ascii text " * 40 + "café").encode(encoding))
    docs = list(iter_documents(path))
    assert docs[0].endswith("caf\ufffd") and read_text_file(path).endswith("caf\ufffd")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".txt.gz"])
def test_binary_files_are_refused_naming_the_file(tmp_path, suffix) -> None:
    path = tmp_path / f"blob{suffix}"
    blob = random.Random(SEED).randbytes(200_000)
    path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
    with pytest.raises(DataError, match="not UTF-8 text") as err:
        check_source(path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match="not UTF-8 text"):
        list(iter_documents(path))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_50_mb_line_stays_in_bounded_memory(tmp_path, suffix) -> None:
    size = 50 * 1024 * 1024
    path = tmp_path / f"huge{suffix}"
    if suffix == ".txt":
        path.write_bytes(b"word " * (size // 5))
    else:
        path.write_bytes(b'{"text": "' + b"w" * size + b'"}\n')
    tracemalloc.start()
    try:
        try:
            longest = max(len(doc) for doc in iter_documents(path))
            assert longest < size // 4  # cut into bounded documents
        except DataError as exc:
            assert suffix == ".jsonl" and f"{MAX_JSONL_LINE_CHARS:,}" in str(exc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_JSONL_LINE_CHARS, f"peak {peak / 2**20:.0f} MiB"


def test_alpaca_outputs_file_follows_the_same_policy(tmp_path) -> None:
    from lensforge.data import alpaca_instructions

    blob = tmp_path / "outputs.json"
    blob.write_bytes(random.Random(SEED).randbytes(5000))
    with pytest.raises(DataError, match="not UTF-8 text"):
        alpaca_instructions(blob)
