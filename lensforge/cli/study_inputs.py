"""Inputs several study commands share: held-out token batches, instruction sequences
(transfer, shortcuts, early-exit) and layer lists ('all', 'every:N', '0,5,10')."""

from __future__ import annotations

import argparse

import torch

from lensforge.analysis.transfer import EvalSequence, load_sequences
from lensforge.cli.common import positive
from lensforge.data import PackedTokenStream, iter_documents
from lensforge.errors import ConfigError
from lensforge.models import ModelAdapter


def heldout_stream(adapter: ModelAdapter, data: str, text_field: str,
                   seq_len: int) -> PackedTokenStream:
    """Packed held-out text of `data`, `seq_len` tokens per sequence."""
    return PackedTokenStream(
        lambda: iter_documents(data, text_field=text_field, split="heldout"),
        adapter.tokenizer, seq_len)


def token_batches(adapter: ModelAdapter, data: str, text_field: str, seq_len: int,
                  batch_size: int, tokens: int) -> list[torch.Tensor]:
    """Held-out token batches [B, T] totalling at least `tokens` tokens."""
    return list(heldout_stream(adapter, data, text_field, seq_len).take_tokens(tokens, batch_size))


def first_tokens(batches: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The leading batches that hold at least `tokens` tokens (ConfigError if none)."""
    out, seen = [], 0
    for b in batches:
        if seen >= tokens:
            break
        out.append(b)
        seen += b.numel()
    if not out:
        raise ConfigError("no data")
    return out


def parse_layers(spec: str | None, n_layers: int, default_every: int = 5) -> list[int]:
    """'3,7,11' or 'every:N' or 'all' -> sorted layer list in 0..n_layers-1."""
    if spec is None:
        spec = f"every:{default_every}"
    try:
        if spec == "all":
            layers = list(range(n_layers))
        elif spec.startswith("every:"):
            step = int(spec.split(":", 1)[1])
            if step < 1:
                raise ValueError
            layers = list(range(0, n_layers, step))
        else:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as exc:
        raise ConfigError(f"--layers must be 'all', 'every:N' or a list like 0,5,10; got "
                          f"'{spec}'") from exc
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ConfigError(f"layers {bad or spec} out of range 0..{n_layers - 1}")
    return layers


def add_sequence_args(p: argparse.ArgumentParser) -> None:
    """Evaluation data shared by transfer, shortcuts and early-exit."""
    g = p.add_argument_group("data")
    g.add_argument("--instructions", default="alpaca",
                   help="'alpaca' (AlpacaEval's 805, cached or fetched from PyPI), 'builtin', "
                        "or a path to AlpacaEval outputs.json; formatted with the chat template")
    g.add_argument("--data", help="use held-out text from this source instead of instructions")
    g.add_argument("--text-field", default="text", help="jsonl/parquet field")
    g.add_argument("--n-instructions", type=positive, default=32, help="instructions to use")
    g.add_argument("--new-tokens", type=int, default=0,
                   help="append the model's greedy reply of this many tokens to each prompt")
    g.add_argument("--seq-len", type=positive, default=512, help="max tokens per sequence")
    g.add_argument("--tokens", type=positive, default=8192, help="tokens of --data text")


def sequences_from_args(args: argparse.Namespace, adapter: ModelAdapter
                        ) -> tuple[list[EvalSequence], str]:
    """The sequences `add_sequence_args` describes, and a line saying what they are."""
    return load_sequences(adapter, data=args.data,
                          instructions=None if args.data else args.instructions,
                          n_instructions=args.n_instructions, new_tokens=args.new_tokens,
                          seq_len=args.seq_len, max_tokens=args.tokens,
                          text_field=args.text_field)
