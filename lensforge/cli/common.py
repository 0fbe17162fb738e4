"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from lensforge.errors import ConfigError
from lensforge.models import DEFAULT_MODEL, ModelAdapter, load_model, parse_dtype
from lensforge.models.loading import check_model_source


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (smollm2, gemma3-270m), folder, .gguf file or hub id "
                        "(default: %(default)s)")
    g.add_argument("--dtype", default="auto",
                   help="model dtype: auto (bf16 on GPU or a CPU with bf16 hardware, else "
                        "float32), float32 or bfloat16")
    g.add_argument("--device", default="cpu", help="torch device")
    g.add_argument("--online", action="store_true",
                   help="let a hub id that is not in the local Hugging Face cache download")
    g.add_argument("--layers-path", help="dotted path of the block list, for unusual models")
    g.add_argument("--norm-path", help="dotted path of the final norm")
    g.add_argument("--lm-head-path", help="dotted path of the unembedding")


def load_model_from_args(args: argparse.Namespace) -> ModelAdapter:
    parts = {k: v for k, v in (("layers", args.layers_path), ("norm", args.norm_path),
                               ("lm_head", args.lm_head_path)) if v}
    return load_model(args.model, dtype=args.dtype, device=args.device, parts=parts or None,
                      online=getattr(args, "online", False))



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every subcommand's --help: a default printed once, and only when it says something
    (not for None, flags that are off, or help text that already states one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if (action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.default == []):
            return text
        return super()._get_help_string(action)


def add_data_args(p: argparse.ArgumentParser, *, default: str = "stdlib") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help="text: .txt/.jsonl/.parquet file or folder (.gz ok), a Hugging Face "
                        "dataset name, or 'stdlib' (built-in corpus)")
    g.add_argument("--text-field", default="text", help="jsonl/parquet field")
    g.add_argument("--seq-len", type=positive, default=512,
                   help="tokens per sequence")
    g.add_argument("--batch-size", type=positive, default=4,
                   help="sequences per batch")


def preflight(args: argparse.Namespace) -> None:
    """Checks every command gets before it runs (cheap; no model load): --out, the model
    options. A command whose --out is a file sets `out_kind="file"` in its defaults."""
    out = getattr(args, "out", None)
    if out is not None:
        check_out_path(out, kind=getattr(args, "out_kind", "folder"))
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if getattr(args, "dtype", None) is not None:
        parse_dtype(args.dtype, args.device if getattr(args, "device", None) else "cpu")
    if getattr(args, "model", None) is not None:
        check_model_source(args.model, online=getattr(args, "online", False))
    check_lens_folders(args)


def check_lens_folders(args: argparse.Namespace) -> None:
    """Read every lens folder a command names (positional lenses, --lens, --native) before
    the model loads, so a corrupt, NaN or mismatched-config lens fails in one line without
    waiting for the model. Binding to the model (hash, shapes) happens later, as before;
    a path that does not exist is left to the command's own message."""
    from lensforge.lenses import load_lens

    for attr in ("lenses", "lens", "native"):
        value = getattr(args, attr, None)
        specs = [value] if isinstance(value, str) else value
        if not isinstance(specs, list):
            continue
        for spec in specs:
            if not isinstance(spec, str):
                continue
            path = Path(spec.partition("=")[2] if "=" in spec else spec)
            if path.is_dir():
                load_lens(path)


def check_out_path(value: str | os.PathLike[str], *, kind: str = "folder",
                   option: str = "--out") -> Path:
    """ConfigError unless ``value`` can be written as an output ``kind`` ("folder"/"file"):
    not an existing path of the other kind, and inside a folder this process can write."""
    path = Path(value).expanduser()
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {value} is an existing file; give a folder")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{option} {value} is an existing folder; give a file name")
    existing = path if kind == "folder" else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {value}: {existing} is a file, not a folder")
    try:  # the only reliable test (os.access says yes to root, and knows no read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".lensforge-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{option} {value}: cannot write in {existing} "
                          f"({exc.strerror or exc})") from exc
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {value}: the file is not writable")
    return path


def check_device(value: str) -> None:
    """ConfigError unless ``value`` is a torch device this machine has."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {value}: not a torch device; use cpu, cuda, cuda:N "
                          "or mps") from None
    if device.type == "cpu":
        return
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ConfigError(f"--device {value}: this machine (torch {torch.__version__}) has no "
                          f"{device.type} device; use --device cpu")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(f"--device {value}: only {count()} {device.type} device(s) here")


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_lens_specs(specs: list[str]) -> dict[str, Path]:
    """'name=path' or 'path' (name = folder name) -> {name: path}; 'logit' is built in."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if name in out:
            raise ConfigError(f"two lenses named '{name}'; use name=path")
        out[name] = Path(path)
    return out


def check_new_out(out: str | os.PathLike[str]) -> Path:
    """ConfigError unless ``out`` is a folder we may create: absent, or an empty folder
    (a lens folder is replaced whole, so anything already there would be lost)."""
    path = check_out_path(out, kind="folder", option="OUT")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"OUT {out} already exists and is not empty; choose a new folder "
                          "(lensforge never replaces files it did not write)")
    return path
