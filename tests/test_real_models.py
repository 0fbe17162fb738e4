"""Real-model smoke tests on the built-in models (slow: run with `pytest -m slow`).

The first run dequantizes each GGUF and caches it under ~/.cache/lensforge/models
(minutes on CPU); later runs load the cached folder in seconds.
"""

from __future__ import annotations

import pytest
import torch

from lensforge.lenses import LogitLens, TunedLens
from lensforge.models import ModelAdapter, load_model

pytestmark = pytest.mark.slow

EXPECTED = {
    "smollm2": {"family": "llama", "tied_embeddings": True, "softcap": None},
    "gemma3-270m": {"family": "gemma3_text", "tied_embeddings": True, "softcap": None},
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def real_adapter(request: pytest.FixtureRequest) -> ModelAdapter:
    try:
        return load_model(request.param)  # runs the exactness self-check
    except ImportError as exc:  # pragma: no cover - the model package is not installed
        pytest.skip(f"{request.param} unavailable: {exc}")


@pytest.fixture(scope="module")
def real_input_ids(real_adapter: ModelAdapter) -> torch.Tensor:
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
    ids = real_adapter.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 5
    return ids


def test_describe(real_adapter: ModelAdapter) -> None:
    info = real_adapter.describe()
    for key, value in EXPECTED[real_adapter.model_id].items():
        assert info[key] == value, key
    assert info["parts"] == {"layers": "model.layers", "norm": "model.norm", "lm_head": "lm_head"}
    assert info["n_layers"] == real_adapter.model.config.num_hidden_layers
    assert info["dtype"] == "float32"


def test_check_exactness_on_text(real_adapter: ModelAdapter, real_input_ids: torch.Tensor) -> None:
    assert real_adapter.check_exactness(real_input_ids) <= 1e-4
    assert real_adapter.check_exactness() <= 1e-4


def test_hidden_states_match_hf(real_adapter: ModelAdapter, real_input_ids: torch.Tensor) -> None:
    L = real_adapter.n_layers
    with torch.no_grad():
        ref = real_adapter.model(real_input_ids, output_hidden_states=True).hidden_states
    ours = real_adapter.hidden_states(real_input_ids)
    assert ours.shape[0] == L + 1 == len(ref)
    for layer in range(L):
        torch.testing.assert_close(ours[layer], ref[layer], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(real_adapter.unembed.norm(ours[L]), ref[L], rtol=1e-5, atol=1e-4)


def test_lenses_on_real_model(real_adapter: ModelAdapter, real_input_ids: torch.Tensor) -> None:
    L = real_adapter.n_layers
    hs = real_adapter.hidden_states(real_input_ids)
    logit = LogitLens.from_model(real_adapter)
    tuned = TunedLens.from_model(real_adapter)
    with torch.no_grad():
        model_logits = real_adapter.model_logits(real_input_ids)
        torch.testing.assert_close(logit(hs[L - 1], L - 1), tuned(hs[L - 1], L - 1), rtol=0, atol=0)
        first = logit(hs[0], 0).log_softmax(-1)
        last = real_adapter.final_logits(hs[L]).log_softmax(-1)
    torch.testing.assert_close(last, model_logits.log_softmax(-1), rtol=1e-4, atol=1e-4)
    # Layer-0 predictions are far from the model's; the model's own are confident somewhere.
    kl_first = float((last.exp() * (last - first)).sum(-1).mean())
    assert kl_first > 0.5
    assert float(last.exp().max()) > 0.2
