"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from lensforge.errors import ConfigError
from lensforge.models import DEFAULT_MODEL, ModelAdapter, load_model


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name (smollm2, gemma3-270m), folder, .gguf file or hub id "
                        "(default: %(default)s)")
    g.add_argument("--dtype", default="auto",
                   help="model dtype: auto (bf16 on GPU or a CPU with bf16 hardware, else "
                        "float32), float32 or bfloat16 (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    g.add_argument("--layers-path", help="dotted path of the block list, for unusual models")
    g.add_argument("--norm-path", help="dotted path of the final norm")
    g.add_argument("--lm-head-path", help="dotted path of the unembedding")


def load_model_from_args(args: argparse.Namespace) -> ModelAdapter:
    parts = {k: v for k, v in (("layers", args.layers_path), ("norm", args.norm_path),
                               ("lm_head", args.lm_head_path)) if v}
    return load_model(args.model, dtype=args.dtype, device=args.device, parts=parts or None)


def add_data_args(p: argparse.ArgumentParser, *, default: str = "stdlib") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help="text: .txt/.jsonl/.parquet file or folder (.gz ok), a Hugging Face "
                        "dataset name, or 'stdlib' (built-in corpus) (default: %(default)s)")
    g.add_argument("--text-field", default="text", help="jsonl/parquet field (default: text)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default: 4)")


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


def print_table(results: dict[str, dict], *, raf: dict[str, float] | None = None) -> None:
    """A short per-lens summary: mean KL, CE, P@1 over layers."""
    print(f"{'lens':<14}{'mean KL':>10}{'mean CE':>10}{'P@1':>8}{'RAF':>8}")
    for name, res in results.items():
        mean = res["mean"]
        r = "" if not raf or name not in raf else f"{raf[name]:.3f}"
        print(f"{name:<14}{mean['kl']:>10.3f}{mean['ce']:>10.3f}{mean['precision@1']:>8.3f}{r:>8}")
