"""Text documents from whatever a user has: local files, folders, a Hugging Face dataset, or the
built-in standard-library corpus.

Everything streams: files are read line by line or by row group, so a corpus larger than memory
is fine. Each source yields plain ``str`` documents; empty or whitespace-only ones are skipped.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lensforge.errors import DataError

# A .txt file is one document, but a multi-GB file would be one multi-GB string; past this many
# characters we cut at the next blank line (paragraph boundary) and start a new document.
TXT_CHUNK_CHARS = 1 << 20
# Lines are read at most this long, so a file with no newlines cannot exhaust memory either.
_MAX_LINE_CHARS = 1 << 20

_TXT_SUFFIXES = (".txt", ".txt.gz")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = _TXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES

STDLIB_SOURCES = ("stdlib", "stdlib:train", "stdlib:heldout")


def iter_documents(
    source: str | os.PathLike[str],
    *,
    text_field: str = "text",
    split: str = "train",
    hf_config: str | None = None,
) -> Iterator[str]:
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


def _dispatch(name: str, *, text_field: str, split: str, hf_config: str | None) -> Iterator[str]:
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


def _open_text(path: Path) -> IO[str]:
    # errors="replace": one bad byte in a 10 GB crawl should not stop training.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_txt(path: str | os.PathLike[str], chunk_chars: int = TXT_CHUNK_CHARS) -> Iterator[str]:
    """One document per file; files over ``chunk_chars`` are cut at blank lines past that size."""
    path = Path(path)
    parts: list[str] = []
    size = 0
    try:
        with _open_text(path) as handle:
            while line := handle.readline(_MAX_LINE_CHARS):
                parts.append(line)
                size += len(line)
                # Cut at a paragraph break once big enough; a pathological file with no blank
                # lines is cut anyway at 4x the size so memory stays bounded.
                if size >= chunk_chars and (not line.strip() or size >= 4 * chunk_chars):
                    yield "".join(parts)
                    parts, size = [], 0
    except (OSError, EOFError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    if parts:
        yield "".join(parts)


def iter_jsonl(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` string of each JSON object, one object per line."""
    path = Path(path)
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from exc
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
    except (OSError, EOFError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc


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
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{path}: column {text_field!r} holds {type(text).__name__}, not text; "
                    "pick a text column with --text-field"
                )
            yield text


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


def _require_nonempty(documents: Iterator[str], name: str) -> Iterator[str]:
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
