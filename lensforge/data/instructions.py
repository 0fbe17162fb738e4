"""AlpacaEval instructions: realistic chat prompts for evaluating lenses on instruct models.

The 805 instructions ship inside the ``alpaca-eval`` sdist on PyPI
(``alpaca_eval-0.6.6/example/outputs.json``), so we fetch that with pip -- no dataset hub
needed -- and cache the JSON. Offline and uncached, a small built-in list stands in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

from lensforge.data.sources import read_text_file
from lensforge.errors import DataError

ALPACA_EVAL_VERSION = "0.6.6"
SDIST_MEMBER = f"alpaca_eval-{ALPACA_EVAL_VERSION}/example/outputs.json"
DEFAULT_CACHE = Path("~/.cache/lensforge/alpaca_eval_outputs.json")

# Stand-ins written for lensforge, in the spirit of AlpacaEval: varied tasks and registers.
BUILTIN_INSTRUCTIONS: tuple[str, ...] = (
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short poem about a lighthouse keeper who is afraid of the dark.",
    "What are three practical tips for improving sleep quality?",
    "Summarize the causes of the French Revolution in one paragraph.",
    "Write a Python function that checks whether a string is a palindrome.",
    "How do vaccines train the immune system?",
    "Give me a recipe for a vegetarian lasagna.",
    "What is the difference between weather and climate?",
    "Draft a polite email asking a colleague to review my report by Friday.",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "List five famous paintings and the artists who painted them.",
    "Why do cats purr?",
    "Explain the idea of compound interest with a numerical example.",
    "Write a haiku about autumn rain.",
    "What are the pros and cons of working from home?",
    "Describe how a bill becomes a law in the United States.",
    "Suggest a name for a coffee shop that also sells books.",
    "How does a refrigerator keep food cold?",
    "Write a limerick about a forgetful robot.",
    "What should I pack for a three-day hiking trip?",
    "Explain recursion to someone who has never programmed.",
    "Compare the climates of Norway and Egypt.",
    "Give me a study plan to learn basic Spanish in three months.",
    "What is photosynthesis, and why does it matter?",
    "Write the opening line of a mystery novel set on a train.",
    "How can I politely decline an invitation to a party?",
    "Explain what a black hole is in simple terms.",
    "What are some good exercises for lower back pain?",
    "Tell me a fun fact about octopuses.",
    "Write a SQL query that returns the ten most recent orders from an orders table.",
    "Why is the Roman Empire considered so influential?",
    "Plan a birthday party for a six-year-old who loves dinosaurs.",
)


def alpaca_instructions(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_path: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> list[str]:
    """The AlpacaEval instructions, in their original order.

    ``path`` may be the ``outputs.json`` file, a folder holding ``example/outputs.json`` (or
    ``outputs.json``), or the ``alpaca_eval-*.tar.gz`` sdist; a given path must exist. Without
    it: the cache (``~/.cache/lensforge/alpaca_eval_outputs.json``), else a pip download of the
    sdist into the cache (when ``download``), else BUILTIN_INSTRUCTIONS with a warning.
    """
    if path is not None:
        return _parse_outputs(_read_outputs_json(Path(path).expanduser()), str(path))
    cache = Path(cache_path if cache_path is not None else DEFAULT_CACHE).expanduser()
    if cache.is_file():
        try:
            return _parse_outputs(cache.read_text(encoding="utf-8"), str(cache))
        except DataError as exc:
            warnings.warn(f"ignoring a corrupt cache ({exc}); fetching again", stacklevel=2)
    failure = "downloading disabled"
    if download:
        try:
            raw = _download_outputs_json()
            instructions = _parse_outputs(raw, f"alpaca-eval=={ALPACA_EVAL_VERSION} sdist")
            _write_atomic(cache, raw)
            return instructions
        except (DataError, OSError, subprocess.SubprocessError) as exc:
            failure = str(exc)
    warnings.warn(
        f"AlpacaEval instructions unavailable ({failure}); using {len(BUILTIN_INSTRUCTIONS)} "
        f"built-in prompts instead. Pass a path to outputs.json or put it at {cache}",
        stacklevel=2,
    )
    return list(BUILTIN_INSTRUCTIONS)


def format_chat(tokenizer: Any, instruction: str) -> str:
    """The instruction as a user turn in the tokenizer's chat template, ready for the reply;
    the raw instruction when the tokenizer has no template (base models)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return instruction


def _read_outputs_json(path: Path) -> str:
    if path.is_dir():
        for candidate in (path / "example" / "outputs.json", path / "outputs.json"):
            if candidate.is_file():
                return read_text_file(candidate)
        raise DataError(f"{path} has no example/outputs.json; point at the file itself")
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz")):
            return _extract_from_sdist(path)
        return read_text_file(path)
    raise DataError(f"AlpacaEval file {path} does not exist; check the path")


def _parse_outputs(raw: str, origin: str) -> list[str]:
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{origin} is not valid JSON ({exc.msg})") from exc
    if not isinstance(records, list) or not records:
        raise DataError(f"{origin} should be a non-empty JSON list of {{'instruction': ...}}")
    instructions = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise DataError(f"{origin}: entry {i} has no 'instruction' string")
        instructions.append(record["instruction"])
    return instructions


def _download_outputs_json() -> str:
    """Fetch the sdist with pip (PyPI only, no build, no dependencies) and read the JSON."""
    with tempfile.TemporaryDirectory(prefix="lensforge-alpaca-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--quiet",
            f"alpaca-eval=={ALPACA_EVAL_VERSION}", "-d", tmp,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        sdists = sorted(Path(tmp).glob("alpaca_eval-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            last = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise DataError(f"pip download of alpaca-eval failed: {last}")
        return _extract_from_sdist(sdists[0])


def _extract_from_sdist(sdist: Path) -> str:
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            member = next(
                (m for m in archive.getmembers() if m.name.endswith("/example/outputs.json")),
                None,
            )
            handle = archive.extractfile(member) if member is not None else None
            if handle is None:
                raise DataError(f"{sdist} has no {SDIST_MEMBER}")
            return handle.read().decode("utf-8")
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"could not read {sdist}: {exc}") from exc


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache need not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
