"""The early-exit decoder calls HF decoder layers by keyword: fail loudly when the installed
transformers changes the forward signatures it relies on (a keyword the layer no longer
names would vanish into **kwargs and silently change generation)."""

from __future__ import annotations

import inspect

import pytest
from helpers import build_tiny_model

from lensforge.early_exit.families import (
    CACHE_KEYWORDS,
    FAMILIES,
    LAYER_KEYWORDS,
    cache_keyword,
    layer_class,
)
from lensforge.models import ModelAdapter

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

# What decoder.py passes to each family's decoder layer, besides the cache, spelled out here
# (not imported) so that a change in the decoder's call shows up as a change in this test.
EXPECTED_LAYER_KEYWORDS = {
    family: ("attention_mask", "position_ids", "use_cache", "position_embeddings")
    for family in ("llama", "mistral", "qwen2", "qwen3")
}


def test_every_table_family_has_an_expected_signature():
    assert set(FAMILIES) == set(EXPECTED_LAYER_KEYWORDS)
    for family, names in EXPECTED_LAYER_KEYWORDS.items():
        assert set(names) == set(LAYER_KEYWORDS), family


@pytest.mark.parametrize("family", sorted(EXPECTED_LAYER_KEYWORDS))
def test_decoder_layer_forward_takes_the_keywords_the_decoder_passes(family):
    import transformers

    cls = layer_class(FAMILIES[family])
    params = inspect.signature(cls.forward).parameters
    names = list(params)
    where = f"{cls.__name__}.forward{inspect.signature(cls.forward)} (transformers " \
            f"{transformers.__version__})"
    assert names[:2] == ["self", "hidden_states"], where
    missing = [k for k in EXPECTED_LAYER_KEYWORDS[family] if k not in params]
    assert not missing, f"{where} no longer names {missing}"
    cache = [k for k in CACHE_KEYWORDS if k in params]
    assert len(cache) == 1, f"{where} names none (or several) of {CACHE_KEYWORDS}"
    # Nothing else is required: the decoder passes no other argument.
    required = [n for n, p in list(params.items())[2:] if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert not required, f"{where} requires {required}"
    assert cache_keyword(cls) == cache[0]


@pytest.mark.parametrize("family", sorted(EXPECTED_LAYER_KEYWORDS))
def test_the_model_uses_the_table_classes_and_modules(family):
    """The tiny model's layers are the table's class, with the modules state propagation
    reads, and the full model takes the cache under a known keyword (prefill)."""
    model = build_tiny_model(family)
    adapter = ModelAdapter(model, model_id=f"tiny-{family}")
    spec = FAMILIES[family]
    layer = adapter.layers[0]
    assert type(layer) is layer_class(spec)
    assert hasattr(layer, "input_layernorm")
    assert all(hasattr(layer.self_attn, n) for n in ("k_proj", "v_proj", "head_dim"))
    assert hasattr(layer.self_attn, "k_norm") == spec.k_norm
    assert list(inspect.signature(model.model.rotary_emb.forward).parameters)[:2] == [
        "x", "position_ids"]
    assert cache_keyword(type(model), ("use_cache",)) in CACHE_KEYWORDS


def test_a_changed_signature_is_an_unsupported_model_error():
    from lensforge.errors import UnsupportedModelError

    class OldLayer:  # transformers < 4.56 named the cache `past_key_value`
        def forward(self, hidden_states, attention_mask=None, position_ids=None,
                    past_key_value=None, use_cache=False, position_embeddings=None, **kwargs):
            return hidden_states

    with pytest.raises(UnsupportedModelError, match="supported transformers"):
        cache_keyword(OldLayer)
