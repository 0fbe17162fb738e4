"""A tiny model + tokenizer saved as a normal HF folder, for CLI tests as a user runs them."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the cat dog runs jumps over a lazy fox and then sleeps under tree while birds "
         "sing loud songs in morning light def return import class print value").split()


def tiny_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(n_docs)]


def make_tiny_model_dir(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny model of `family` and a word-level tokenizer (vocab < 128) to `folder`."""
    from helpers import build_tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                        bos_token="<bos>", unk_token="[UNK]")
    model = build_tiny_model(family, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tiny_corpus(n_docs, seed)))
    return path
