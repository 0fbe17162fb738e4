"""Write a benchmark's results into its own section of docs/benchmarks.md.

Each benchmark owns the text between `<!-- BEGIN name -->` and `<!-- END name -->`,
so several benchmarks can update the one page without clobbering each other.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nMeasured numbers only, each with the machine it came from.\n"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def update_section(name: str, markdown: str, page: Path = PAGE) -> Path:
    """Replace (or append) the section `name` of docs/benchmarks.md with `markdown`."""
    page.parent.mkdir(parents=True, exist_ok=True)
    text = page.read_text() if page.exists() else HEADER
    block = f"<!-- BEGIN {name} -->\n{markdown.strip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->",
                         re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    tmp = page.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, page)
    return page
