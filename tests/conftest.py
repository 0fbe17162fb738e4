"""Shared fixtures: a matrix of tiny random causal LMs, one per supported family.

Reusable fixtures:
  tiny_model(family)    -> a fresh tiny HF causal LM (fp32, eval mode, seeded)
  tiny_adapter(family)  -> ModelAdapter around tiny_model(family)
  family                -> parametrized over TINY_FAMILIES (request it to run a test per family)
  tiny_input_ids        -> a fixed [2, 9] batch of token ids valid for every tiny model

Models are built from configs (no network) and every 1-D parameter (norm weights,
biases) is perturbed, so norm quirks such as Gemma's `(1 + weight)` are exercised
rather than hidden behind an all-ones or all-zeros init.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from lensforge.models import ModelAdapter

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """Factory: tiny_model(family, seed=0) -> a fresh tiny HF causal LM."""
    return build_tiny_model


@pytest.fixture
def tiny_adapter() -> Callable[..., ModelAdapter]:
    """Factory: tiny_adapter(family="llama", seed=0) -> ModelAdapter of a fresh tiny model."""

    def make(family: str = "llama", seed: int = SEED) -> ModelAdapter:
        return ModelAdapter(build_tiny_model(family, seed), model_id=f"tiny-{family}")

    return make


@pytest.fixture(params=TINY_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Every tiny family in turn."""
    return request.param


@pytest.fixture
def tiny_input_ids() -> torch.Tensor:
    """[2, 9] token ids, valid for every tiny model (VOCAB = 128)."""
    gen = torch.Generator().manual_seed(123)
    return torch.randint(3, VOCAB, (2, 9), generator=gen)
