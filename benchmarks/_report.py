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
    return (f"{cpu} ({bf16_flags()}), {os.cpu_count()} cores visible, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), {gpu}")


def bf16_flags() -> str:
    """The CPU's bf16 matmul flags, e.g. "avx512_bf16" or "no bf16 hardware"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "bf16 flags unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    have = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return "+".join(have) if have else "no bf16 hardware"


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
