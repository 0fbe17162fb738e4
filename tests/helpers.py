"""Test helpers that tests import (`from helpers import ...`); fixtures live in conftest.py.

- tiny_config(family) / build_tiny_model(family, seed): tiny random causal LMs built from
  configs (no network), one per supported family (TINY_FAMILIES), with every 1-D parameter
  (norm weights, biases) perturbed, so norm quirks such as Gemma's `(1 + weight)` are
  exercised rather than hidden behind an all-ones or all-zeros init;
- HIDDEN, VOCAB, N_LAYERS: their sizes;
- char_tokenizer(): a character-level tokenizer inside that vocabulary;
- perturbed_copy(model): a sibling model for the lens-transfer analyses.

Models saved as a folder with a word-level tokenizer, for CLI tests, are in tiny_folder.py.
"""

from __future__ import annotations

import copy
import string
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

HIDDEN = 32
VOCAB = 128
N_LAYERS = 3
SEED = 0
# Small enough that the soft-cap visibly bends the logits of a tiny random model.
GEMMA2_SOFTCAP = 2.0

# Families with a tiny config below, plus hand-built variants.
TINY_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "olmo2",
    "gpt2",
    "gpt_neox",
    "phi3",
    "phi",  # real family whose untied lm_head has a bias
    "llama_head_bias",  # llama with an untied, biased lm_head swapped in by hand
)


def _decoder_kwargs(**extra: object) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(extra)
    return base


def tiny_config(family: str) -> PretrainedConfig:
    """The config of a tiny random model of `family`."""
    import transformers as tf

    if family in ("llama", "llama_head_bias"):
        return tf.LlamaConfig(**_decoder_kwargs(tie_word_embeddings=family == "llama"))
    if family == "mistral":
        return tf.MistralConfig(**_decoder_kwargs(sliding_window=4))
    if family == "qwen2":
        return tf.Qwen2Config(**_decoder_kwargs(tie_word_embeddings=True))
    if family == "qwen3":
        return tf.Qwen3Config(**_decoder_kwargs(head_dim=8, tie_word_embeddings=False))
    if family == "gemma2":
        return tf.Gemma2Config(
            **_decoder_kwargs(
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=4,
                final_logit_softcapping=GEMMA2_SOFTCAP,
                attn_logit_softcapping=50.0,
            )
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **_decoder_kwargs(
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            )
        )
    if family == "olmo2":
        return tf.Olmo2Config(**_decoder_kwargs(tie_word_embeddings=False))
    if family == "phi3":
        return tf.Phi3Config(**_decoder_kwargs(tie_word_embeddings=False))
    if family == "phi":
        return tf.PhiConfig(**_decoder_kwargs(partial_rotary_factor=0.5, tie_word_embeddings=False))
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=64,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            intermediate_size=2 * HIDDEN,
            max_position_embeddings=64,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    raise ValueError(f"no tiny config for family '{family}'")


def build_tiny_model(family: str, seed: int = SEED) -> nn.Module:
    """A fresh, seeded, fp32 tiny model of `family` in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed + 1)
    if family == "llama_head_bias":
        head = nn.Linear(HIDDEN, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.1)
        model.lm_head = head
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norm weights and biases: move them off their init values
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.float().eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer inside the tiny models' 128-token vocabulary: the 95
    printable ASCII characters and newline, plus [UNK]/<bos>/<eos> (pad = eos)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<eos>")


def perturbed_copy(model: nn.Module, scale: float = 0.02, seed: int = 0) -> nn.Module:
    """A sibling of `model` of the same shape (as an instruct model is of its base): a deep
    copy with every weight w <- w + scale * std(w) * noise, seeded."""
    sibling = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sibling.parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.add_(noise * scale * (p.float().std() if p.numel() > 1 else 1.0))
    return sibling
