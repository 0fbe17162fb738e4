"""What the early-exit decode loop needs from a Hugging Face model family, in one table.

The loop (decoder.py) drives the model's own modules one by one: the embedding,
`model.model.rotary_emb(h, position_ids) -> (cos, sin)`, each decoder layer called as

    layer(h, attention_mask=None, position_ids=..., use_cache=True,
          position_embeddings=(cos, sin), <cache keyword>=cache)

and, for CALM's state propagation of skipped blocks, each block's `input_layernorm`,
`self_attn.{k,v}_proj` (+ `self_attn.k_norm` where the table says so). Everything that
differs between families is a row of `FAMILIES`; `resolve` checks a loaded model against
its row once per generation, and tests/test_decoder_signature.py checks the installed
transformers' decoder layers against the keywords the loop passes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from torch import nn

from lensforge.early_exit.kv import DecoderLayer
from lensforge.errors import UnsupportedModelError

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

# Keywords the loop passes to every decoder layer (the cache keyword apart, see below).
LAYER_KEYWORDS = ("attention_mask", "position_ids", "use_cache", "position_embeddings")
# The cache keyword, newest first: transformers 5.x names it `cache` and deprecates
# `past_key_values` (removed in 5.40); 4.56 .. 5.x take `past_key_values`. (Before 4.56 it
# was `past_key_value`, which the loop does not support: the floor is 4.56.)
CACHE_KEYWORDS = ("cache", "past_key_values")
TRANSFORMERS_RANGE = ">=4.56,<5.40"


@dataclass(frozen=True)
class FamilySpec:
    """One family's row: its decoder-layer class and its attention quirks."""

    layer_class: str  # "module:Class" of the decoder layer, for the signature check
    k_norm: bool  # per-head RMSNorm on k before rotary (self_attn.k_norm), as in Qwen3
    # How the config marks sliding-window attention, which the loop cannot do:
    # "sliding_window": any set `sliding_window` (Mistral); "layer_types": a
    # "sliding_attention" layer type or `use_sliding_window` (Qwen2/3); None: never.
    sliding: str | None


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("transformers.models.llama.modeling_llama:LlamaDecoderLayer",
                        k_norm=False, sliding=None),
    "mistral": FamilySpec("transformers.models.mistral.modeling_mistral:MistralDecoderLayer",
                          k_norm=False, sliding="sliding_window"),
    "qwen2": FamilySpec("transformers.models.qwen2.modeling_qwen2:Qwen2DecoderLayer",
                        k_norm=False, sliding="layer_types"),
    "qwen3": FamilySpec("transformers.models.qwen3.modeling_qwen3:Qwen3DecoderLayer",
                        k_norm=True, sliding="layer_types"),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def layer_class(spec: FamilySpec) -> type[nn.Module]:
    """The decoder-layer class a row names, imported from the installed transformers."""
    module, name = spec.layer_class.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


@functools.cache
def cache_keyword(cls: type[nn.Module], required: tuple[str, ...] = LAYER_KEYWORDS) -> str:
    """The keyword `cls.forward` takes the KV cache under, read from its signature once per
    class (not per step); UnsupportedModelError if it takes none the loop knows, or lacks
    one of `required` (a keyword it does not name would vanish into **kwargs)."""
    params = inspect.signature(cls.forward).parameters
    names = [k for k in CACHE_KEYWORDS if k in params]
    missing = [k for k in required if k not in params]
    if not names or missing:
        import transformers

        raise UnsupportedModelError(
            f"{cls.__name__}.forward in transformers {transformers.__version__} takes "
            f"{list(params)[1:]}; early-exit generation passes "
            f"{[*required, ' or '.join(CACHE_KEYWORDS)]} (supported transformers "
            f"{TRANSFORMERS_RANGE})"
        )
    return names[0]


@dataclass(frozen=True)
class ModelParts:
    """A supported model's modules the loop drives, and the cache keywords to call them with."""

    spec: FamilySpec
    embed: nn.Embedding
    rotary: nn.Module
    layers: Sequence[DecoderLayer]
    layer_cache_kw: str  # for each decoder layer
    model_cache_kw: str  # for the full model (prefill)


def resolve(adapter: ModelAdapter) -> ModelParts:
    """The parts of `adapter`'s model, checked against its family's row; else
    UnsupportedModelError saying what is supported."""
    family = str(adapter.family)
    supported = ", ".join(SUPPORTED_FAMILIES)
    spec = FAMILIES.get(family)
    if spec is None:
        raise UnsupportedModelError(
            f"early-exit generation does not support the '{family}' family yet "
            f"(supported: {supported}); it needs each block's K/V projections for CALM's "
            "state propagation"
        )
    if _uses_sliding_window(adapter.config, spec):
        raise UnsupportedModelError(
            f"early-exit generation needs full attention; this {family} model uses sliding-window "
            f"attention (supported: {supported} without sliding windows)"
        )
    inner = getattr(adapter.model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    layers = adapter.layers
    attn = getattr(layers[0], "self_attn", None)
    needed = ((layers[0], "input_layernorm"), (attn, "k_proj"), (attn, "v_proj"))
    if rotary is None or attn is None or not all(hasattr(m, n) for m, n in needed) or \
            hasattr(attn, "k_norm") != spec.k_norm:
        raise UnsupportedModelError(
            f"this {family} model's modules differ from what early exit expects "
            f"(model.rotary_emb, input_layernorm, self_attn.k_proj/v_proj"
            f"{', self_attn.k_norm' if spec.k_norm else ', no self_attn.k_norm'}; "
            f"supported: {supported}, transformers {TRANSFORMERS_RANGE})"
        )
    # (ignores: mypy takes a class object for unhashable when checking functools.cache's
    # Hashable argument; classes are hashable)
    return ModelParts(spec=spec, embed=adapter.input_embeddings(), rotary=rotary,
                      layers=cast(Sequence[DecoderLayer], layers),  # checked just above
                      layer_cache_kw=cache_keyword(type(layers[0])),  # type: ignore[arg-type]
                      model_cache_kw=cache_keyword(type(adapter.model),  # type: ignore[arg-type]
                                                   ("use_cache",)))


def _uses_sliding_window(config: object, spec: FamilySpec) -> bool:
    if not getattr(config, "sliding_window", None) or spec.sliding is None:
        return False
    if spec.sliding == "sliding_window":
        return True
    return "sliding_attention" in (getattr(config, "layer_types", None) or []) or bool(
        getattr(config, "use_sliding_window", False))
