"""Pack tokenized documents into fixed-length training sequences, resumably and shardably.

The *global stream* is the concatenation ``doc_0 EOS doc_1 EOS ...`` cut into consecutive
sequences of ``seq_len`` tokens (``seq_len - 1`` plus a BOS when ``bos=True``); the remainder of a
document carries over into the next sequence. It depends only on the documents, the tokenizer
and (``seq_len``, ``bos``, ``eos_id``, ``bos_id``) -- never on batch size, rank or world size.

Sharding: rank ``r`` of ``world_size`` reads global sequences ``r, r + W, r + 2W, ...``. Sequences
are handed out in *rounds* of ``W``; a final incomplete round is dropped so that every rank yields
the same number of rows (data-parallel ranks must step in lockstep).

Resuming: the state is a position in the global stream -- (document index, token offset inside
that document) of the next unread round, plus the number of global sequences consumed. It is
small, JSON-able and identical on all ranks that have consumed the same number of rows, so rank
0 can save it for everyone. It stays valid for a different world size: the resumed run continues
at the same global sequence, and the union over ranks is still every global sequence exactly once.
Restoring skips the consumed documents without tokenizing them (cheap for files; for generated
or streamed sources it means producing them again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch

from lensforge.errors import ConfigError, DataError, DataExhaustedError

DocumentFactory = Callable[[], Iterable[str]]

STATE_FORMAT = "lensforge.packed_token_stream/1"


@dataclass(frozen=True)
class _Segment:
    """Tokens ``tokens`` starting at token ``offset`` of document ``doc`` (EOS counts as a token)."""

    doc: int
    offset: int
    tokens: np.ndarray


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, preferring to cut just before whitespace.

    Cutting before a space keeps words like " the" whole for byte-level BPEs, so the tokens are
    (almost always) the ones whole-document tokenization would give. Deterministic.
    """
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        window = text[start + max_chars // 2 : end]
        cut = max(window.rfind(" "), window.rfind("\n"))
        if cut > 0:
            end = start + max_chars // 2 + cut
        yield text[start:end]
        start = end
    yield text[start:]


class PackedTokenStream:
    """Iterable of ``LongTensor[seq_len]`` rows packed from documents; see the module docstring.

    Args:
        documents: a callable returning a *fresh* iterator of documents each time (so the stream
            can restart and resume), e.g. ``lambda: iter_documents("data/")``.
        tokenizer: a Hugging Face tokenizer; no special tokens are added to documents.
        seq_len: tokens per row, BOS included.
        eos_id: token joining documents; defaults to ``tokenizer.eos_token_id``.
        bos: start every row with ``bos_id`` (default ``tokenizer.bos_token_id``).
        rank, world_size: data-parallel shard.
        docs_per_batch, chars_per_batch: tokenize this many documents (or characters) per call.
        chunk_chars: longer documents are tokenized in pieces of this many characters.

    Use one iterator at a time: iterating advances the stream's own position, which
    ``state_dict()`` reports (rows yielded so far, never rows merely prefetched).
    """

    def __init__(
        self,
        documents: DocumentFactory,
        tokenizer: Any,
        seq_len: int,
        *,
        eos_id: int | None = None,
        bos: bool = False,
        bos_id: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        docs_per_batch: int = 256,
        chars_per_batch: int = 1 << 21,
        chunk_chars: int = 1 << 16,
    ) -> None:
        if not callable(documents):
            raise ConfigError(
                "documents must be a callable returning a fresh iterator (e.g. "
                "`lambda: iter_documents(path)`), so the stream can restart and resume"
            )
        eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        if eos_id is None:
            raise ConfigError(
                "the tokenizer has no EOS token to join documents with; pass eos_id explicitly"
            )
        if bos:
            bos_id = tokenizer.bos_token_id if bos_id is None else bos_id
            if bos_id is None:
                raise ConfigError("bos=True but the tokenizer has no BOS token; pass bos_id")
        if seq_len < (2 if bos else 1):
            raise ConfigError(f"seq_len must be at least {2 if bos else 1}, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        if min(docs_per_batch, chars_per_batch, chunk_chars) < 1:
            raise ConfigError("docs_per_batch, chars_per_batch and chunk_chars must be positive")
        self.documents = documents
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.eos_id = int(eos_id)
        self.bos = bos
        self.bos_id = int(bos_id) if bos and bos_id is not None else None
        self.rank = rank
        self.world_size = world_size
        self.docs_per_batch = docs_per_batch
        self.chars_per_batch = chars_per_batch
        self.chunk_chars = chunk_chars
        # Position of the next unread round in the global stream.
        self._doc_index = 0
        self._token_offset = 0
        self._sequences = 0  # global sequences consumed (all ranks together)

    # -- position ----------------------------------------------------------------------------

    @property
    def sequences_consumed(self) -> int:
        """Global sequences consumed by all ranks together (a multiple of ``world_size``)."""
        return self._sequences

    @property
    def tokens_consumed(self) -> int:
        """Global tokens consumed by all ranks together, BOS included."""
        return self._sequences * self.seq_len

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able position; identical on all ranks in lockstep."""
        return {
            "format": STATE_FORMAT,
            "doc_index": self._doc_index,
            "token_offset": self._token_offset,
            "sequences": self._sequences,
            "seq_len": self.seq_len,
            "bos": self.bos,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "vocab_size": len(self.tokenizer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the packing settings must match those it was saved with."""
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a PackedTokenStream state (format {state.get('format')!r})")
        mine = self.state_dict()
        for key in ("seq_len", "bos", "eos_id", "bos_id", "vocab_size"):
            if state.get(key) != mine[key]:
                raise ConfigError(
                    f"data state was saved with {key}={state.get(key)!r} but this run has "
                    f"{key}={mine[key]!r}; resume with the same tokenizer and packing settings"
                )
        self._doc_index = int(state["doc_index"])
        self._token_offset = int(state["token_offset"])
        self._sequences = int(state["sequences"])

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Rows ``LongTensor[seq_len]`` of this rank, from the current position to the end."""
        world = self.world_size
        stream = self._global_sequences(self._doc_index, self._token_offset)
        while True:
            round_ = list(islice(stream, world))
            if len(round_) < world:
                return  # incomplete last round dropped: ranks stay in lockstep
            # Advance before yielding so state_dict() during the consumer's step is up to date.
            self._doc_index, self._token_offset = round_[-1][1]
            self._sequences += world
            yield self._to_row(round_[self.rank][0])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """``LongTensor[batch_size, seq_len]`` batches; an incomplete last batch is dropped."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        rows = iter(self)
        while len(batch := list(islice(rows, batch_size))) == batch_size:
            yield torch.stack(batch)

    def take_tokens(self, n_tokens: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Batches until ``n_tokens`` global tokens (all ranks, since the stream's start,
        including before a resume) have been consumed; the last batch may overshoot.

        Raises DataExhaustedError if the data runs out first -- never stops silently.
        """
        if n_tokens < 1:
            raise ConfigError(f"the token budget must be positive, got {n_tokens}")
        batches = self.batches(batch_size)
        while self.tokens_consumed < n_tokens:
            batch = next(batches, None)
            if batch is None:
                raise DataExhaustedError(
                    f"data ran out after {self.tokens_consumed:,} tokens of the requested "
                    f"{n_tokens:,}; add data or lower --tokens"
                )
            yield batch

    def _to_row(self, tokens: np.ndarray) -> torch.Tensor:
        if self.bos:
            tokens = np.concatenate([np.array([self.bos_id], dtype=np.int64), tokens])
        return torch.from_numpy(tokens)

    # -- the global stream -------------------------------------------------------------------

    def _global_sequences(
        self, start_doc: int, start_offset: int
    ) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        """(sequence tokens without BOS, position of the token after it), in order."""
        need = self.seq_len - (1 if self.bos else 0)
        buffer: deque[_Segment] = deque()
        buffered = 0
        tail = (start_doc, start_offset)  # position right after the last buffered token
        for segment, ends_doc in self._segments(start_doc, start_offset):
            buffer.append(segment)
            buffered += len(segment.tokens)
            end = segment.offset + len(segment.tokens)
            tail = (segment.doc + 1, 0) if ends_doc else (segment.doc, end)
            while buffered >= need:
                parts: list[np.ndarray] = []
                remaining = need
                while remaining:
                    head = buffer[0]
                    if len(head.tokens) <= remaining:
                        parts.append(head.tokens)
                        remaining -= len(head.tokens)
                        buffer.popleft()
                    else:
                        parts.append(head.tokens[:remaining])
                        buffer[0] = _Segment(
                            head.doc, head.offset + remaining, head.tokens[remaining:]
                        )
                        remaining = 0
                buffered -= need
                position = (buffer[0].doc, buffer[0].offset) if buffer else tail
                yield np.concatenate(parts), position

    def _segments(self, start_doc: int, start_offset: int) -> Iterator[tuple[_Segment, bool]]:
        """Token segments of documents from ``start_doc`` on (first ``start_offset`` tokens of it
        dropped), each with whether it ends its document (then its last token is EOS)."""
        documents = iter(self.documents())
        for skipped in range(start_doc):
            if next(documents, None) is None:
                raise DataError(
                    f"the data state points at document {start_doc} but the source has only "
                    f"{skipped}; the data changed since the state was saved -- resume with the "
                    "same data or start afresh"
                )
        pending: list[tuple[int, str, bool]] = []  # (doc index, text piece, last piece of doc)
        pending_chars = 0
        running = {"doc": start_doc, "offset": 0}

        def flush() -> Iterator[tuple[_Segment, bool]]:
            texts = [text for _, text, _ in pending]
            encoded = self.tokenizer(
                texts, add_special_tokens=False, return_attention_mask=False, verbose=False
            )["input_ids"]
            for (doc, _, last), ids in zip(pending, encoded, strict=True):
                tokens = np.asarray(ids, dtype=np.int64)
                if last:
                    tokens = np.append(tokens, np.int64(self.eos_id))
                if doc != running["doc"]:
                    running["doc"], running["offset"] = doc, 0
                offset = running["offset"]
                running["offset"] += len(tokens)
                if doc == start_doc and offset < start_offset:
                    if running["offset"] <= start_offset:
                        if last:
                            raise DataError(
                                f"the data state points at token {start_offset} of document "
                                f"{doc}, which has only {running['offset']}; the data or "
                                "tokenizer changed since the state was saved"
                            )
                        continue
                    tokens = tokens[start_offset - offset :]
                    offset = start_offset
                yield _Segment(doc, offset, tokens), last

        for doc, text in enumerate(documents, start=start_doc):
            for piece, last in _mark_last(split_text(text, self.chunk_chars)):
                pending.append((doc, piece, last))
                pending_chars += len(piece)
                if len(pending) >= self.docs_per_batch or pending_chars >= self.chars_per_batch:
                    yield from flush()
                    pending.clear()
                    pending_chars = 0
        if pending:
            yield from flush()


def _mark_last(pieces: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Pair each item with whether it is the last one, without materialising the iterator."""
    previous = next(pieces)
    for piece in pieces:
        yield previous, False
        previous = piece
    yield previous, True
