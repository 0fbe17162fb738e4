"""Token sequences as overlapping windows, padded into batches, for per-position analyses.

A sequence longer than `window` runs as several windows: each later window re-reads
`window - stride` tokens of context and contributes only its last `stride` positions, so
every position is computed exactly once and keeps at least `window - stride` tokens of
context (its whole prefix when the sequence fits in one window). Windows of similar length
share a right-padded batch, so a handful of long texts and many short ones both run in
few forward passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lensforge.errors import ConfigError

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

# Most models' attention cost grows with the square of the window; beyond this the
# windows gain little context and cost a lot of memory.
MAX_DEFAULT_WINDOW = 1024


@dataclass(frozen=True)
class Piece:
    """One window of sequence `seq`: it reads tokens [start, end) and keeps the results of
    positions [keep_from, end) (the earlier ones are context, kept by an earlier window)."""

    seq: int
    start: int
    keep_from: int
    end: int


def next_tokens(ids: Tensor | Sequence[int]) -> Tensor:
    """[T] -> [T]: ids shifted left, -1 at the end (no true next token there)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return torch.cat([ids[1:], torch.full((1,), -1, dtype=torch.long)])


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, keep_from, end) per window covering positions 0..n-1 exactly once."""
    out, start, covered = [], 0, 0
    while covered < n:
        end = min(start + window, n)
        out.append((start, covered, end))
        covered = end
        start += stride
    return out


def window_and_stride(adapter: ModelAdapter, window: int | None,
                      stride: int | None) -> tuple[int, int]:
    """Defaults: the model's position limit (at most MAX_DEFAULT_WINDOW), stride window // 2."""
    if window is None:
        limit = getattr(getattr(adapter, "config", None), "max_position_embeddings", None)
        window = min(int(limit), MAX_DEFAULT_WINDOW) if limit else MAX_DEFAULT_WINDOW
    if stride is None:
        stride = max(1, window // 2)
    if window < 1 or not 1 <= stride <= window:
        raise ConfigError(f"need window >= 1 and 1 <= stride <= window, got {window}, {stride}")
    return window, stride


def pad_id(adapter: ModelAdapter) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0 (masked anyway)."""
    tok = getattr(adapter, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) if tok is not None else None
    return int(pad) if pad is not None and pad < adapter.vocab_size else 0


def plan_pieces(seqs: Sequence[Tensor], window: int, stride: int) -> list[Piece]:
    """Every window of every sequence, in sequence order."""
    return [Piece(i, start, keep_from, end)
            for i, seq in enumerate(seqs)
            for start, keep_from, end in windows(int(seq.numel()), window, stride)]


def padded_batches(seqs: Sequence[Tensor], pieces: Sequence[Piece], batch_size: int,
                   pad: int) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor]]:
    """Batches of pieces, shortest first so similar lengths share padding.

    Yields (indices into `pieces`, ids [b, W], attention mask [b, W], next-token targets
    [b, W] with -1 at padding and at each sequence's last position).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(pieces)), key=lambda j: pieces[j].end - pieces[j].start)
    targets_of = [next_tokens(seq) for seq in seqs]
    for b0 in range(0, len(order), batch_size):
        indices = order[b0:b0 + batch_size]
        width = max(pieces[j].end - pieces[j].start for j in indices)
        ids = torch.full((len(indices), width), pad, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        targets = torch.full((len(indices), width), -1, dtype=torch.long)
        for row, j in enumerate(indices):
            p = pieces[j]
            n = p.end - p.start
            ids[row, :n] = seqs[p.seq][p.start:p.end]
            mask[row, :n] = 1
            targets[row, :n] = targets_of[p.seq][p.start:p.end]
        yield indices, ids, mask, targets
