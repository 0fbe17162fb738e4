"""Self-distillation data: text sampled from the model itself.

The tuned-lens maintainers recommend it for instruct models, whose hidden states on web text can
be off-distribution. Sampling uses the model's full distribution (no top-k / top-p truncation)
so the lens is trained on what the model actually predicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lensforge.errors import ConfigError

# Used when the tokenizer has no BOS token and no prompts are given.
GENERIC_STARTS = (
    "The",
    "In",
    "A",
    "It",
    "This",
    "When",
    "One",
    "We",
    "There",
    "If",
    "Today",
    "Once upon a time",
)


def generate_documents(
    model: Any,
    tokenizer: Any,
    n_docs: int,
    max_new_tokens: int = 256,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    temperature: float = 1.0,
) -> Iterator[str]:
    """Yield ``n_docs`` texts sampled from ``model``; deterministic given ``seed`` (same device).

    Document ``i`` starts from ``prompts[i % len(prompts)]`` (the prompt text is included in
    the document). Without prompts it starts from BOS alone, or from GENERIC_STARTS when the
    tokenizer has no BOS. The global RNG state is left untouched.
    """
    if n_docs < 0 or max_new_tokens < 1 or batch_size < 1 or temperature <= 0:
        raise ConfigError(
            "need n_docs >= 0, max_new_tokens >= 1, batch_size >= 1 and temperature > 0"
        )
    bos_id = tokenizer.bos_token_id
    if prompts is not None and len(prompts) == 0:
        raise ConfigError("prompts is empty; pass at least one prompt or None")
    if prompts is not None:
        starts: Sequence[str] = prompts
    else:
        starts = ("",) if bos_id is not None else GENERIC_STARTS
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = next(model.parameters()).device
    model.eval()
    for first in range(0, n_docs, batch_size):
        indices = range(first, min(first + batch_size, n_docs))
        input_ids, attention_mask = _left_padded(
            [_prompt_ids(tokenizer, starts[i % len(starts)], bos_id) for i in indices], pad_id
        )
        # A per-batch seed makes batch k independent of how many batches ran before it.
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed * 1_000_003 + first)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
            )
        width = input_ids.shape[1]
        for row, mask in zip(output.cpu(), attention_mask, strict=True):
            yield _decode(tokenizer, row[:width][mask.bool()], row[width:])


def _decode(tokenizer: Any, prompt: torch.Tensor, generated: torch.Tensor) -> str:
    """Prompt (padding removed) + continuation up to its first EOS (generate pads after it)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is not None:
        hits = (generated == eos_id).nonzero()
        if len(hits):
            generated = generated[: int(hits[0, 0])]
    return tokenizer.decode(torch.cat([prompt, generated]).tolist(), skip_special_tokens=True)


def _prompt_ids(tokenizer: Any, prompt: str, bos_id: int | None) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id, *ids]
    if not ids:
        raise ConfigError(f"prompt {prompt!r} tokenizes to nothing; use a non-empty prompt")
    return ids


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every row's continuation starts right after its own prompt."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask
