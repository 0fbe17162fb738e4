"""ModelAdapter across the tiny-model matrix: parts, hidden states, exactness, quirks, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import GEMMA2_SOFTCAP, HIDDEN, N_LAYERS, VOCAB
from torch import Tensor, nn

from lensforge.errors import NonFiniteError, ShapeError, UnsupportedModelError
from lensforge.lenses import LogitLens
from lensforge.models import ModelAdapter

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

# Where each family keeps its final norm (ground truth, independent of the detector).
EXPECTED_NORM = {
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "phi": "model.final_layernorm",
}
EXPECTED_LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
BIASED_HEADS = {"phi", "llama_head_bias"}


def reference_unembed(adapter: ModelAdapter, h: Tensor) -> Tensor:
    """Slow reference for z = cap(W_U norm(h) + b), built from the model's own modules and
    config rather than from the adapter's Unembed."""
    model = adapter.model
    norm = model.get_submodule(EXPECTED_NORM.get(adapter.family, "model.norm"))
    head = model.get_output_embeddings()
    logits = nn.functional.linear(norm(h), head.weight, getattr(head, "bias", None))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


# --------------------------------------------------------------------------- parts
def test_parts_detected(family: str, tiny_adapter) -> None:
    adapter = tiny_adapter(family)
    model = adapter.model
    assert adapter.paths.layers == EXPECTED_LAYERS.get(family, "model.layers")
    assert adapter.paths.norm == EXPECTED_NORM.get(family, "model.norm")
    assert adapter.layers is model.get_submodule(adapter.paths.layers)
    assert adapter.unembed.norm is model.get_submodule(adapter.paths.norm)
    assert adapter.unembed.lm_head is model.get_output_embeddings()
    assert (adapter.n_layers, adapter.hidden_size, adapter.vocab_size) == (N_LAYERS, HIDDEN, VOCAB)
    assert adapter.tied == bool(model.config.tie_word_embeddings)
    assert not (adapter.tied and family in BIASED_HEADS)
    assert (adapter.unembed.bias is not None) == (family in BIASED_HEADS)
    assert adapter.describe()["n_layers"] == N_LAYERS
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------- hidden states
def test_hidden_states_match_hf(family: str, tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter(family)
    with torch.no_grad():
        ref = adapter.model(tiny_input_ids, output_hidden_states=True).hidden_states
    ours = adapter.hidden_states(tiny_input_ids)
    assert ours.shape == (N_LAYERS + 1, *tiny_input_ids.shape, HIDDEN)
    for layer in range(N_LAYERS):  # h_l enters block l == HF hidden_states[l]
        torch.testing.assert_close(ours[layer], ref[layer], rtol=0, atol=1e-6)
    # HF's last entry is already normed; ours (h_L) is the pre-norm residual.
    with torch.no_grad():
        torch.testing.assert_close(adapter.unembed.norm(ours[N_LAYERS]), ref[N_LAYERS])
    assert not torch.allclose(ours[N_LAYERS], ref[N_LAYERS], atol=1e-3)


def test_hidden_states_subset_and_padding(family: str, tiny_adapter) -> None:
    adapter = tiny_adapter(family)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = adapter.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    subset = adapter.hidden_states(ids, mask, layers=[2, 0])
    torch.testing.assert_close(subset[0], ref[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(subset[1], ref[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------- exactness
def test_identity_lens_reproduces_model_logits(
    family: str, tiny_adapter, tiny_input_ids: Tensor
) -> None:
    adapter = tiny_adapter(family)
    h_final = adapter.hidden_states(tiny_input_ids, layers=[N_LAYERS])[0]
    with torch.no_grad():
        ours = adapter.final_logits(h_final)
        theirs = adapter.model(tiny_input_ids).logits
    assert ours.shape == (*tiny_input_ids.shape, VOCAB)
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert adapter.check_exactness(tiny_input_ids) <= 1e-4
    assert adapter.check_exactness() <= 1e-4


def test_logit_lens_matches_reference_unembed(
    family: str, tiny_adapter, tiny_input_ids: Tensor
) -> None:
    adapter = tiny_adapter(family)
    lens = LogitLens.from_model(adapter)
    hs = adapter.hidden_states(tiny_input_ids)
    with torch.no_grad():
        for layer in (0, N_LAYERS - 1):
            torch.testing.assert_close(
                lens(hs[layer], layer), reference_unembed(adapter, hs[layer])
            )
        torch.testing.assert_close(lens.transform_all(hs[:N_LAYERS]), hs[:N_LAYERS])
        # The reference also reproduces the model's own logits from h_L.
        torch.testing.assert_close(
            reference_unembed(adapter, hs[N_LAYERS]), adapter.model(tiny_input_ids).logits
        )


def test_softcap_applied_for_gemma2_only(family: str, tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter(family)
    if family != "gemma2":
        assert adapter.unembed.softcap is None
        return
    assert adapter.unembed.softcap == GEMMA2_SOFTCAP
    h_final = adapter.hidden_states(tiny_input_ids, layers=[N_LAYERS])[0]
    with torch.no_grad():
        raw = adapter.unembed.lm_head(adapter.unembed.norm(h_final))
        capped = adapter.final_logits(h_final)
        model_logits = adapter.model(tiny_input_ids).logits
    assert float((raw - capped).abs().max()) > 1e-2  # the cap really bends these logits
    torch.testing.assert_close(capped, GEMMA2_SOFTCAP * torch.tanh(raw / GEMMA2_SOFTCAP))
    torch.testing.assert_close(capped, model_logits, rtol=0, atol=1e-5)
    assert float(capped.abs().max()) < GEMMA2_SOFTCAP


def test_gemma2_without_softcap_fails_self_check(tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter("gemma2")
    adapter.unembed.softcap = None  # simulate an adapter that forgot the quirk
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        adapter.check_exactness(tiny_input_ids)


# ------------------------------------------------------------ unsupported models
class _Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.down(torch.tanh(self.up(h)))


class WeirdLM(nn.Module):
    """A causal LM whose parts follow no known naming scheme (and which has no config)."""

    def __init__(self, hidden: int = 16, vocab: int = 50, n_blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, hidden)
        self.stack = nn.ModuleList(_Block(hidden) for _ in range(n_blocks))
        self.final_ln = nn.LayerNorm(hidden)
        self.readout = nn.Linear(hidden, vocab)

    def get_input_embeddings(self) -> nn.Module:
        return self.tok

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object):
        h = self.tok(input_ids)
        for block in self.stack:
            h = block(h)
        return SimpleNamespace(logits=self.readout(self.final_ln(h)))


WEIRD_PARTS = dict(layers="stack", norm="final_ln", lm_head="readout")


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, "layers"),
        ({"layers": "stack"}, "final norm"),
        ({"layers": "stack", "norm": "final_ln"}, "unembedding"),
        ({"layers": "stack", "norm": "final_ln", "lm_head": "nope"}, "unembedding"),
    ],
)
def test_unsupported_model_names_missing_part(given: dict, missing: str) -> None:
    with pytest.raises(UnsupportedModelError, match=missing):
        ModelAdapter(WeirdLM(), parts=given)


def test_layers_path_must_be_a_list() -> None:
    with pytest.raises(UnsupportedModelError, match="not a list of blocks"):
        ModelAdapter(WeirdLM(), parts=dict(WEIRD_PARTS, layers="final_ln"))


def test_explicit_parts_make_unusual_model_work() -> None:
    model = WeirdLM()
    adapter = ModelAdapter(model, model_id="weird", parts=WEIRD_PARTS)
    assert adapter.layers is model.stack and adapter.unembed.norm is model.final_ln
    assert (adapter.n_layers, adapter.hidden_size, adapter.vocab_size) == (3, 16, 50)
    ids = torch.tensor([[1, 2, 3, 4]])
    hs = adapter.hidden_states(ids)
    with torch.no_grad():
        h = model.tok(ids)
        for layer, block in enumerate(model.stack):
            torch.testing.assert_close(hs[layer], h)
            h = block(h)
        torch.testing.assert_close(hs[3], h)
    assert adapter.check_exactness(ids) <= 1e-5
    assert adapter.unembed.bias is model.readout.bias


# ------------------------------------------------------------------ interventions
def test_edit_residual_zero_matches_manual_computation() -> None:
    model = WeirdLM()
    adapter = ModelAdapter(model, parts=WEIRD_PARTS)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with adapter.edit_residual(1, torch.zeros_like):
            edited = adapter.model_logits(ids)
        h = torch.zeros(1, 5, 16)
        for block in model.stack[1:]:
            h = block(h)
        manual = model.readout(model.final_ln(h))
        unedited = adapter.model_logits(ids)
    torch.testing.assert_close(edited, manual)
    assert not torch.allclose(edited, unedited, atol=1e-3)


def test_edit_residual_on_family(family: str, tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter(family)
    base_logits = adapter.model_logits(tiny_input_ids)
    base_hs = adapter.hidden_states(tiny_input_ids)

    with adapter.edit_residual(1, lambda h: h):
        torch.testing.assert_close(
            adapter.model_logits(tiny_input_ids), base_logits, rtol=0, atol=0
        )

    with adapter.edit_residual(1, lambda h: 2.0 * h):
        edited_hs = adapter.hidden_states(tiny_input_ids)
        edited_logits = adapter.model_logits(tiny_input_ids)
    torch.testing.assert_close(edited_hs[0], base_hs[0], rtol=0, atol=0)
    torch.testing.assert_close(edited_hs[1], 2.0 * base_hs[1])
    assert not torch.allclose(edited_logits, base_logits, atol=1e-4)

    # Zeroing the final residual: logits are what the unembedding makes of zeros.
    with adapter.edit_residual(N_LAYERS, torch.zeros_like):
        zeroed = adapter.model_logits(tiny_input_ids)
    with torch.no_grad():
        expected = reference_unembed(adapter, torch.zeros(*tiny_input_ids.shape, HIDDEN))
    torch.testing.assert_close(zeroed, expected)

    # The hook is gone after the context exits.
    torch.testing.assert_close(adapter.model_logits(tiny_input_ids), base_logits, rtol=0, atol=0)


def test_edit_residual_removes_hook_on_error(tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter("llama")
    base = adapter.model_logits(tiny_input_ids)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.edit_residual(0, torch.zeros_like):
            raise RuntimeError("boom")
    torch.testing.assert_close(adapter.model_logits(tiny_input_ids), base, rtol=0, atol=0)


# ------------------------------------------------------------------------- errors
def test_nan_hidden_states_raise(tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter("llama")
    with torch.no_grad():
        adapter.model.get_input_embeddings().weight[int(tiny_input_ids[0, 0])] = float("nan")
    with pytest.raises(NonFiniteError):
        adapter.hidden_states(tiny_input_ids)
    hs = adapter.hidden_states(tiny_input_ids, check_finite=False)
    assert torch.isnan(hs).any()


def test_nan_from_edit_raises(tiny_adapter, tiny_input_ids: Tensor) -> None:
    adapter = tiny_adapter("gpt2")
    with adapter.edit_residual(1, lambda h: h * float("nan")):
        with pytest.raises(NonFiniteError):
            adapter.hidden_states(tiny_input_ids, layers=[1])


def test_out_of_range_token_raises(tiny_adapter) -> None:
    adapter = tiny_adapter("qwen2")
    with pytest.raises(ShapeError, match="vocabulary"):
        adapter.hidden_states(torch.tensor([[1, 2, VOCAB]]))


@pytest.mark.parametrize("bad", [[-1], [N_LAYERS + 1], []])
def test_bad_layer_index_raises(tiny_adapter, tiny_input_ids: Tensor, bad: list[int]) -> None:
    adapter = tiny_adapter("llama")
    with pytest.raises(ShapeError):
        adapter.hidden_states(tiny_input_ids, layers=bad)


def test_bad_input_shape_and_edit_layer_raise(tiny_adapter) -> None:
    adapter = tiny_adapter("llama")
    with pytest.raises(ShapeError):
        adapter.hidden_states(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ShapeError):
        with adapter.edit_residual(N_LAYERS + 1, torch.zeros_like):
            pass
