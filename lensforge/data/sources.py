"""Text documents from whatever a user has: local files, folders, a Hugging Face dataset, or the
built-in standard-library corpus.

Everything streams: files are read line by line or by row group, so a corpus larger than memory
is fine. Each source yields plain ``str`` documents; empty or whitespace-only ones are skipped.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import json
import os
import re
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO

from lensforge.errors import DataError

# A .txt file is one document, but a multi-GB file would be one multi-GB string; past this many
# characters we cut at the next blank line (paragraph boundary) and start a new document.
TXT_CHUNK_CHARS = 1 << 20
# Lines are read at most this long, so a file with no newlines cannot exhaust memory either.
_MAX_LINE_CHARS = 1 << 20
# A JSONL record must be parsed whole; longer lines are refused rather than read into memory.
MAX_JSONL_LINE_CHARS = 1 << 25

# Text-encoding policy, shared by every reader (data files, `show --file`, instructions):
# decode UTF-8 (a BOM is dropped) with undecodable bytes replaced by U+FFFD, so one bad byte
# in a large crawl does not stop a run; but a file where more than MAX_BAD_FRACTION of the
# characters are U+FFFD, NUL or other control characters is not text, and is refused.
MAX_BAD_FRACTION = 0.05
_BAD_CHARS = re.compile(r"[\ufffd\x00-\x08\x0e-\x1f\x7f]")
# How much of a file is checked before anything is read from it (see check_source).
_SNIFF_CHARS = 1 << 16

_TXT_SUFFIXES = (".txt", ".txt.gz")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = _TXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES

STDLIB_SOURCES = ("stdlib", "stdlib:train", "stdlib:heldout")
# Built-in general text (lensforge/data/general.py); names only, imported lazily.
ALPACA_SOURCES = ("alpaca", "alpaca:train", "alpaca:heldout")
GENERAL_SOURCES = ("general", "general:train", "general:heldout")


def iter_documents(
    source: str | os.PathLike[str],
    *,
    text_field: str = "text",
    split: str = "train",
    hf_config: str | None = None,
) -> Generator[str, None, None]:
    """Yield the non-empty text documents of ``source``, streaming, in a deterministic order.

    ``source`` is ``"stdlib"`` / ``"stdlib:train"`` / ``"stdlib:heldout"`` (built-in corpus;
    plain ``"stdlib"`` uses ``split``), a ``.txt`` / ``.jsonl`` / ``.parquet`` file (``.gz`` for
    the text formats), a folder of them (recursive, sorted), or else a Hugging Face dataset name
    (needs ``datasets``; ``split`` and ``hf_config`` apply). ``text_field`` names the JSON key or
    Parquet / dataset column holding the text.

    Raises DataError for a missing path, a folder without readable files, a missing field, or a
    source that yields no non-empty document (raised lazily, on iteration).
    """
    name = os.fspath(source)
    documents = _dispatch(name, text_field=text_field, split=split, hf_config=hf_config)
    return _require_nonempty(documents, name)


def check_source(
    source: str | os.PathLike[str], *, text_field: str = "text", split: str = "train"
) -> None:
    """Fail now, before any expensive work, on a data source that cannot work: a missing path,
    an unsupported or unreadable file, a file that is not text, a wrong ``text_field`` in the
    first records, or no document at all. Reads only the start of each file; Hugging Face
    dataset names are only resolved (no download)."""
    name = os.fspath(source)
    if name in STDLIB_SOURCES + GENERAL_SOURCES + ALPACA_SOURCES:
        return
    path = Path(name).expanduser()
    if not (path.is_dir() or path.is_file()):
        _dispatch(name, text_field=text_field, split=split, hf_config=None)
        return
    documents = iter_documents(name, text_field=text_field, split=split)  # checks the suffix
    try:
        for file in list_data_files(path) if path.is_dir() else [path]:
            if not file.name.lower().endswith(_PARQUET_SUFFIXES):
                read_text_file(file, max_bytes=_SNIFF_CHARS)
        next(documents)  # raises DataError when no file yields a document
    except StopIteration:  # pragma: no cover - _require_nonempty raises instead
        pass
    finally:
        documents.close()


def _dispatch(name: str, *, text_field: str, split: str, hf_config: str | None) -> Iterator[str]:
    if name in GENERAL_SOURCES + ALPACA_SOURCES:
        from lensforge.data.general import builtin_documents

        return builtin_documents(name, split)
    if name in STDLIB_SOURCES:
        from lensforge.data.stdlib_corpus import stdlib_documents

        return stdlib_documents(name.split(":", 1)[1] if ":" in name else split)
    path = Path(name).expanduser()
    if path.is_dir():
        files = list_data_files(path)
        if not files:
            raise DataError(
                f"folder {path} has no readable data files; put {', '.join(SUPPORTED_SUFFIXES)} "
                "files in it (searched recursively)"
            )
        return _iter_files(files, text_field)
    if path.is_file():
        if not path.name.lower().endswith(SUPPORTED_SUFFIXES):
            raise DataError(
                f"{path} is not a supported data file; use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return _iter_files([path], text_field)
    if _looks_like_path(name):
        raise DataError(f"data path {name} does not exist; check the path")
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"data path {name} does not exist, and `datasets` is not installed to load it as a "
            "Hugging Face dataset; fix the path or `pip install lensforge[hf]`"
        )
    return _iter_hf_dataset(name, text_field=text_field, split=split, hf_config=hf_config)


def list_data_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Supported data files under ``folder``, recursive, sorted by relative path (deterministic).

    Hidden files and folders (names starting with ``.``) are skipped.
    """
    root = Path(folder)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith(".") and filename.lower().endswith(SUPPORTED_SUFFIXES):
                found.append(Path(dirpath) / filename)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a Hub dataset id: absolute, relative-dotted, or a file suffix."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1  # Hub ids are "name" or "owner/name"
        or name.lower().endswith(SUPPORTED_SUFFIXES)
    )


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        lower = path.name.lower()
        if lower.endswith(_TXT_SUFFIXES):
            yield from iter_txt(path)
        elif lower.endswith(_JSONL_SUFFIXES):
            yield from iter_jsonl(path, text_field)
        else:
            yield from iter_parquet(path, text_field)


def bad_char_count(text: str) -> int:
    """Characters that are not text: U+FFFD (an undecodable byte), NUL and C0/DEL controls
    other than tab, newlines, vertical tab and form feed."""
    return len(_BAD_CHARS.findall(text))


def check_text(text: str, name: str) -> str:
    """Return ``text``, or raise DataError if more than MAX_BAD_FRACTION of it is not text."""
    bad = bad_char_count(text)
    if bad and bad > MAX_BAD_FRACTION * len(text):
        raise DataError(_not_text_message(name, bad, len(text)))
    return text


def _not_text_message(name: str, bad: int, total: int) -> str:
    return (f"{name} is not UTF-8 text ({bad:,} of {total:,} characters are undecodable bytes "
            f"or control characters, over {MAX_BAD_FRACTION:.0%}); convert it to UTF-8 text")


def decode_text(data: bytes, name: str, *, final: bool = True) -> str:
    """Bytes -> str under the text-encoding policy (see MAX_BAD_FRACTION). ``final=False``:
    ``data`` is a prefix, so a character cut at its end is dropped, not counted as bad."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    return check_text(decoder.decode(data, final=final), name)


def read_text_file(path: str | os.PathLike[str], max_bytes: int | None = None) -> str:
    """A whole text file (``.gz`` ok; at most ``max_bytes`` of it) under the text-encoding
    policy; DataError if it is missing, unreadable or not text."""
    path = Path(path)
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:
            data = handle.read(-1 if max_bytes is None else max_bytes)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {_reason(exc)}") from exc
    return decode_text(data, str(path), final=max_bytes is None or len(data) < max_bytes)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _open_text(path: Path) -> IO[str]:
    # errors="replace": one bad byte in a 10 GB crawl should not stop training; the share of
    # replaced bytes is checked by _text_lines.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def _text_lines(path: Path, max_line: int) -> Iterator[str]:
    """Lines of a text file (each at most ``max_line`` characters), under the encoding policy:
    a file whose first _SNIFF_CHARS characters, or whose whole text, are not text is refused.
    Read errors (truncated gzip, I/O) become DataError."""
    read_text_file(path, max_bytes=_SNIFF_CHARS)  # a binary file fails here, whatever its kind
    total = bad = 0
    sniffed = False
    try:
        with _open_text(path) as handle:
            while line := handle.readline(max_line):
                total += len(line)
                bad += bad_char_count(line)
                if not sniffed and total >= _SNIFF_CHARS:
                    sniffed = True
                    _check_counts(path, bad, total)
                yield line
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"could not read {path}: {_reason(exc)}") from exc
    _check_counts(path, bad, total)


def _check_counts(path: Path, bad: int, total: int) -> None:
    if bad and bad > MAX_BAD_FRACTION * total:
        raise DataError(_not_text_message(str(path), bad, total))


def iter_txt(path: str | os.PathLike[str], chunk_chars: int = TXT_CHUNK_CHARS) -> Iterator[str]:
    """One document per file; files over ``chunk_chars`` are cut at blank lines past that size."""
    path = Path(path)
    parts: list[str] = []
    size = 0
    for line in _text_lines(path, _MAX_LINE_CHARS):
        parts.append(line)
        size += len(line)
        # Cut at a paragraph break once big enough; a pathological file with no blank
        # lines is cut anyway at 4x the size so memory stays bounded.
        if size >= chunk_chars and (not line.strip() or size >= 4 * chunk_chars):
            yield "".join(parts)
            parts, size = [], 0
    if parts:
        yield "".join(parts)


def iter_jsonl(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` string of each JSON object, one object per line."""
    path = Path(path)
    for lineno, line in enumerate(_text_lines(path, MAX_JSONL_LINE_CHARS + 1), start=1):
        if len(line) > MAX_JSONL_LINE_CHARS:
            raise DataError(f"{path}, line {lineno}: longer than {MAX_JSONL_LINE_CHARS:,} "
                            "characters; split the record or use a .txt file")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or e.g. an int over Python's digit limit
            raise DataError(f"{path}, line {lineno}: invalid JSON "
                            f"({getattr(exc, 'msg', exc)})") from exc
        except RecursionError as exc:
            raise DataError(f"{path}, line {lineno}: JSON nested too deeply") from exc
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}, line {lineno}: no field {text_field!r} (found {keys}); "
                "pass the right one with --text-field"
            )
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{path}, line {lineno}: field {text_field!r} is a "
                f"{type(text).__name__}, not text; pick a text field with --text-field"
            )
        yield text


def iter_parquet(
    path: str | os.PathLike[str], text_field: str = "text", batch_rows: int = 1024
) -> Iterator[str]:
    """The ``text_field`` column of a Parquet file, read in row batches (never the whole file)."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"could not read {path} as Parquet: {exc}") from exc
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"{path}: no column {text_field!r} (found {columns}); "
            "pass the right one with --text-field"
        )
    for batch in _parquet_batches(parquet, path, batch_rows, text_field):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{path}: column {text_field!r} holds {type(text).__name__}, not text; "
                    "pick a text column with --text-field"
                )
            yield text


def _parquet_batches(parquet, path: Path, batch_rows: int, text_field: str) -> Iterator:
    batches = parquet.iter_batches(batch_size=batch_rows, columns=[text_field])
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # truncated or corrupt pages: pyarrow raises several types
            raise DataError(f"could not read {path} as Parquet: {exc}") from exc
        if batch is None:
            return
        yield batch


def _iter_hf_dataset(
    name: str, *, text_field: str, split: str, hf_config: str | None
) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, hf_config, split=split, streaming=True)
    except Exception as exc:  # network, auth, unknown name: all user-fixable
        raise DataError(
            f"{name!r} is not a local path and could not be loaded as a Hugging Face dataset "
            f"(split={split!r}, config={hf_config!r}): {exc}"
        ) from exc
    for row in dataset:
        if text_field not in row:
            raise DataError(
                f"dataset {name!r} has no column {text_field!r} (found {sorted(row)}); "
                "pass the right one with --text-field"
            )
        text = row[text_field]
        if isinstance(text, str):
            yield text


def _require_nonempty(documents: Iterator[str], name: str) -> Generator[str, None, None]:
    """Skip blank documents; fail loudly if nothing at all is left."""
    count = 0
    for text in documents:
        if text and not text.isspace():
            count += 1
            yield text
    if count == 0:
        raise DataError(
            f"data source {name} has no non-empty documents; point it at files with text "
            "(and check --text-field)"
        )
