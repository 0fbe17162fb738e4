"""`lensforge` command line: one subcommand per module `lensforge/cli/cmd_*.py`.

Each such module defines `register(subparsers)`, adding its parser with
`set_defaults(func=...)`. Any LensforgeError becomes a one-line message and exit 2.
Before a command runs, `preflight` checks what every command shares (--out, --device,
--dtype, --model), so those mistakes fail at once, before a model loads.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from lensforge import __version__
from lensforge.cli.common import preflight
from lensforge.errors import LensforgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensforge",
        description="Logit, tuned and LoRA lenses for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"lensforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module("lensforge.cli")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"lensforge.cli.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    debug = bool(os.environ.get("LENSFORGE_DEBUG"))
    try:
        preflight(args)
        result = args.func(args)
    except LensforgeError as exc:
        if debug:
            raise
        print(f"lensforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
            NotADirectoryError) as exc:
        if debug:
            raise
        print(f"lensforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lensforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — last resort: one line, traceback on request
        if debug:
            raise
        print(
            f"lensforge {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(set LENSFORGE_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 3
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
