"""Lens transfer between sibling models (LoRA-Lens paper Fig. 5a), and the instruction
data that the transfer, shortcut and early-exit analyses share.

A lens trained on model A (e.g. a base model) is applied unchanged to a sibling B of the
same shape (e.g. its instruct version) and scored on B's text against lenses trained on B
itself: per-layer KL(p_L^B ‖ q_l) and RAF against a native reference lens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor

from lensforge.data import PackedTokenStream, alpaca_instructions, format_chat, iter_documents
from lensforge.errors import ConfigError, DataError
from lensforge.evaluation import evaluate, raf_table
from lensforge.lenses import Lens

if TYPE_CHECKING:
    from lensforge.metrics import LayerMetrics
    from lensforge.models.adapter import ModelAdapter

INSTRUCTION_SOURCES = ("alpaca", "builtin")


class TransferResult(TypedDict):
    """What `transfer_eval` returns (keys in this order)."""

    results: dict[str, LayerMetrics]  # "<name> (A)" then "<name> (B)" lenses, logit added
    reference: str | None  # "<name> (B)", or None without native lenses
    raf: dict[str, float]  # against the reference; empty without one


@dataclass
class EvalSequence:
    """One evaluation sequence: ids [T]; `start` = first position the early-exit analysis
    scores (the first reply token's position when a reply was generated, else 0);
    `input_len` = the prompt length (N in the CALM rule)."""

    ids: Tensor
    start: int
    input_len: int


def instruction_prompts(source: str = "alpaca", n: int | None = None) -> list[str]:
    """Instructions: 'alpaca' (AlpacaEval's 805, cached or fetched from PyPI; built-in
    stand-ins offline), 'builtin', or a path to AlpacaEval's outputs.json / sdist."""
    from lensforge.data import BUILTIN_INSTRUCTIONS

    if source == "builtin":
        prompts = list(BUILTIN_INSTRUCTIONS)
    elif source == "alpaca":
        prompts = alpaca_instructions()
    else:
        prompts = alpaca_instructions(source)
    return prompts[:n] if n else prompts


@torch.no_grad()
def instruction_sequences(adapter: ModelAdapter, prompts: Sequence[str], *, new_tokens: int = 0,
                          max_len: int = 512) -> list[EvalSequence]:
    """Format each prompt with the model's chat template (raw text without one) and, when
    `new_tokens` > 0, append the model's own greedy reply, so lenses are scored on what
    the model actually generates."""
    tok = adapter.tokenizer
    if tok is None:
        raise ConfigError("instruction data needs the model's tokenizer")
    out = []
    for prompt in prompts:
        text = format_chat(tok, prompt)
        # A chat template already holds the special tokens it needs.
        templated = bool(getattr(tok, "chat_template", None))
        ids = tok(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"][0]
        ids = ids[:max_len]
        n_prompt = ids.numel()
        if n_prompt == 0:
            continue
        if new_tokens > 0:
            model: Any = adapter.model  # generate() is HF's GenerationMixin
            generated = model.generate(
                ids[None].to(adapter.device), attention_mask=torch.ones_like(ids[None]).to(
                    adapter.device), max_new_tokens=new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )[0].cpu()
            ids = generated[:max_len]
        start = n_prompt - 1 if ids.numel() > n_prompt else 0
        out.append(EvalSequence(ids, start, n_prompt))
    if not out:
        raise DataError("no instruction produced any tokens")
    return out


def text_sequences(adapter: ModelAdapter, data: str, *, text_field: str = "text", seq_len: int = 512,
                   max_tokens: int = 16_384) -> list[EvalSequence]:
    """Held-out packed sequences of a text source (start 0, N = seq_len)."""
    stream = PackedTokenStream(lambda: iter_documents(data, text_field=text_field,
                                                      split="heldout"),
                               adapter.tokenizer, seq_len)
    out = []
    for row in stream.batches(1):
        out.append(EvalSequence(row[0], 0, seq_len))
        if len(out) * seq_len >= max_tokens:
            break
    if not out:
        raise DataError(f"no held-out sequence of {seq_len} tokens in {data}")
    return out


def load_sequences(adapter: ModelAdapter, *, data: str | None, instructions: str | None,
                   n_instructions: int, new_tokens: int, seq_len: int, max_tokens: int,
                   text_field: str = "text") -> tuple[list[EvalSequence], str]:
    """Instruction sequences when `instructions` is given, else held-out text of `data`.
    Returns the sequences and a one-line description of them."""
    if instructions:
        seqs = instruction_sequences(adapter, instruction_prompts(instructions, n_instructions),
                                     new_tokens=new_tokens, max_len=seq_len)
        return seqs, (f"{len(seqs)} instructions from {instructions} (chat template: "
                      f"{bool(getattr(adapter.tokenizer, 'chat_template', None))}, "
                      f"{new_tokens} greedy reply tokens)")
    if not data:
        raise ConfigError("give --instructions or --data")
    seqs = text_sequences(adapter, data, text_field=text_field, seq_len=seq_len,
                          max_tokens=max_tokens)
    return seqs, f"{len(seqs)} held-out sequences of {seq_len} tokens from {data}"


def evaluate_sequences(adapter: ModelAdapter, lenses: Mapping[str, Lens],
                       sequences: Iterable[EvalSequence]) -> dict[str, LayerMetrics]:
    """Per-layer metrics (as `evaluate`, logit lens added) over positions ≥ seq.start of
    each sequence: the generated reply when there is one, else every position."""
    def masked() -> Iterator[tuple[Tensor, Tensor]]:
        for seq in sequences:
            ids = seq.ids[None]
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, seq.start:] = True
            yield ids, mask

    try:
        return evaluate(adapter, lenses, masked())
    except DataError as exc:
        raise DataError("no tokens to evaluate") from exc


def transfer_eval(adapter_b: ModelAdapter, transferred: Mapping[str, Lens], native: Mapping[str, Lens],
                  sequences: Sequence[EvalSequence], *, reference: str | None = None
                  ) -> TransferResult:
    """Score lenses trained on A (`transferred`) and on B (`native`) on B's sequences.

    Lens names get suffixes ' (A)' and ' (B)'. RAF of every lens is taken against
    `reference` (a native lens name; default: the native tuned lens, else the first)."""
    if not transferred:
        raise ConfigError("no transferred lens given")
    lenses = {f"{n} (A)": lens for n, lens in transferred.items()}
    lenses.update({f"{n} (B)": lens for n, lens in native.items()})
    if reference is None and native:
        reference = next((n for n, lens in native.items() if lens.lens_type == "tuned"),
                         next(iter(native)))
    results = evaluate_sequences(adapter_b, lenses, sequences)
    raf = {}
    if reference is not None:
        ref_key = f"{reference} (B)"
        if ref_key not in results:
            raise ConfigError(f"reference '{reference}' is not one of the native lenses "
                              f"{sorted(native)}")
        raf = raf_table(results, ref_key)
    return {"results": results, "reference": None if reference is None else f"{reference} (B)",
            "raf": raf}
