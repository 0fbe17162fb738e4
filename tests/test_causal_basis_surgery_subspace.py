"""Causal basis extraction, model surgery checks and W_U subspace ablations: known answers
on synthetic maps and tiny models, plus one CLI run per subcommand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import VOCAB, build_tiny_model, char_tokenizer
from torch import nn

from lensforge.analysis.causal_basis import (
    ablate,
    ablation_targets,
    causal_basis_report,
    extract_causal_basis,
    lens_logits_fn,
    resample_permutation,
    restricted_unembed,
    spearman,
)
from lensforge.analysis.subspace import (
    ablation_kls,
    lens_subspace_ablation,
    output_basis,
    remove_subspace,
    residual_subspace_ablation,
)
from lensforge.analysis.surgery import (
    gradient_alignment,
    identity_ablation_losses,
    identity_block,
    random_cosine_quantiles,
    residual_gradients,
)
from lensforge.cli.main import main
from lensforge.errors import ConfigError
from lensforge.lenses import LogitLens
from lensforge.models import ModelAdapter

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


def identity_from(model: nn.Module, first: int) -> nn.Module:
    """Zero the attention and MLP output projections of llama blocks >= first: those blocks
    become the identity, so h_first reaches the final norm unchanged."""
    with torch.no_grad():
        for block in model.model.layers[first:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


def ids_batches(n: int = 2, b: int = 2, t: int = 12, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (b, t), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------- ablation
def test_ablation_targets_set_the_coefficient():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 6, generator=g)
    u = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    c = h @ u
    perm = resample_permutation(50, seed=1)
    assert not (perm == torch.arange(50)).any()  # nothing resampled from itself
    for mode, expect in (("mean", c.mean().expand(50)), ("zero", torch.zeros(50)),
                         ("resample", c[perm])):
        out = ablate(h, u, ablation_targets(c, mode, perm))
        torch.testing.assert_close(out @ u, expect, atol=1e-5, rtol=0)
        # The orthogonal complement is untouched.
        torch.testing.assert_close(out - (out @ u)[:, None] * u, h - c[:, None] * u,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        ablation_targets(c, "bogus")


# --------------------------------------------------------------------------- CBE
def planted_map(width: int = 16, vocab: int = 24, seed: int = 0):
    """Logits read one (non-axis) direction d; everything else only through tiny noise."""
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(width, generator=g), dim=0)
    # Small logit shifts keep KL in its quadratic regime, where whitened data make d optimal.
    w = 0.3 * torch.outer(torch.randn(vocab, generator=g), d) + 0.002 * torch.randn(
        vocab, width, generator=g)
    return (lambda h: h @ w.T), d


def whitened(n: int, width: int, seed: int = 3) -> torch.Tensor:
    """Data with sample covariance exactly I: no direction is favoured by its variance, so
    the KL-maximizing direction is the one the map reads (a finite random sample would tilt
    the optimum toward its top principal direction, which is correct CBE behaviour)."""
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.T @ x / n)
    return torch.linalg.solve_triangular(chol, x.T, upper=False).T.float()


@pytest.mark.parametrize("mode", ["mean", "zero", "resample"])
def test_cbe_finds_the_planted_direction_first(mode):
    logits_fn, d = planted_map()
    # Zero ablation also removes the data mean along u, which would favour the mean's
    # direction; centred data keep d the optimum for every mode.
    h = whitened(200, 16) + (0.0 if mode == "zero" else 0.5)
    basis = extract_causal_basis(logits_fn, h, 2, ablation=mode, steps=60, lr=0.1,
                                 tokens_per_step=64, seed=1)
    u = basis.directions
    torch.testing.assert_close(u @ u.T, torch.eye(2), atol=1e-5, rtol=0)
    assert abs(float(u[0] @ d)) > 0.99
    e = basis.energies
    assert e[0] > 20 * e[1] >= 0  # the rest is read only through 1%-size noise
    assert e[0] > 0.02


def test_cbe_vocab_subset_surrogate_still_finds_the_direction(tiny_adapter):
    adapter = tiny_adapter("llama")
    lens = LogitLens.from_model(adapter)
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(adapter.hidden_size, generator=g), dim=0)
    # Plant: W_U reads (almost) only d, so ablating d destroys the prediction.
    with torch.no_grad():
        adapter.unembed.lm_head.weight.copy_(
            torch.outer(torch.randn(VOCAB, generator=g) * 0.3, d)
            + 0.002 * torch.randn(VOCAB, adapter.hidden_size, generator=g))
    h = whitened(300, adapter.hidden_size)
    fn = lens_logits_fn(lens, 1, adapter.unembed)
    ids = torch.arange(0, VOCAB, 2)
    sub = lens_logits_fn(lens, 1, restricted_unembed(adapter.unembed, ids))
    torch.testing.assert_close(sub(h[:5]), fn(h[:5])[:, ids])
    basis = extract_causal_basis(fn, h, 1, steps=60, lr=0.1, tokens_per_step=64,
                                 surrogate_fn=sub)
    assert abs(float(basis.directions[0] @ d)) > 0.95  # random: |cos| ~ 0.18 in 32 dims


def test_causal_fidelity_is_exact_when_the_rest_of_the_model_is_the_identity():
    """With blocks >= 1 the identity, the model's output is the logit lens at layer 1, so a
    direction's model influence must equal its lens influence, and Spearman = 1."""
    adapter = ModelAdapter(identity_from(build_tiny_model("llama"), 1), model_id="tiny")
    lens = LogitLens.from_model(adapter)
    rep = causal_basis_report(adapter, lens, ids_batches(), [1], 3, steps=15,
                              tokens_per_step=32)
    row = rep["layers"][0]
    torch.testing.assert_close(torch.tensor(row["model_influence"]),
                               torch.tensor(row["energies"]), rtol=1e-3, atol=1e-6)
    assert row["spearman"] == pytest.approx(1.0)
    assert rep["bases"][1].shape == (3, adapter.hidden_size)


def test_causal_fidelity_differs_on_a_real_path():
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny")
    lens = LogitLens.from_model(adapter)
    rep = causal_basis_report(adapter, lens, ids_batches(n=1), [0], 3, steps=10,
                              tokens_per_step=24)
    row = rep["layers"][0]
    assert max(abs(a - b) for a, b in zip(row["energies"], row["model_influence"],
                                          strict=True)) > 1e-4
    assert -1.0 <= row["spearman"] <= 1.0
    assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0]))


# ------------------------------------------------------------------------ surgery
def test_identity_block_on_a_block_that_is_already_identity_changes_nothing():
    adapter = ModelAdapter(identity_from(build_tiny_model("llama"), 2), model_id="tiny")
    res = identity_ablation_losses(adapter, ids_batches())
    assert res["loss"][2] == pytest.approx(res["baseline"], abs=1e-5)
    assert abs(res["loss"][0] - res["baseline"]) > 1e-3  # a real block does matter


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_block_returns_the_input_in_the_block_format(family):
    adapter = ModelAdapter(build_tiny_model(family), model_id="tiny")
    ids = ids_batches(n=1)[0]
    with identity_block(adapter.layers[1]):
        hs = adapter.hidden_states(ids, layers=[1, 2])
    torch.testing.assert_close(hs[0], hs[1])


def test_identity_block_handles_tuple_outputs():
    class TupleBlock(nn.Module):
        def forward(self, hidden_states, extra=None):
            return hidden_states * 3, "cache"

    block = TupleBlock()
    x = torch.randn(2, 3)
    with identity_block(block):
        out = block(x)
    assert out[1] == "cache" and torch.equal(out[0], x)
    assert torch.equal(block(x)[0], 3 * x)


def test_residual_gradient_matches_finite_differences():
    model = build_tiny_model("llama").double()
    adapter = ModelAdapter(model, model_id="tiny")
    ids = ids_batches(n=1)[0]
    hs, grads, loss = residual_gradients(adapter, ids)
    assert hs.shape == grads.shape == (adapter.n_layers + 1, *ids.shape, adapter.hidden_size)
    from lensforge.analysis.surgery import next_token_ce

    def loss_with(layer, delta):
        with adapter.edit_residual(layer, lambda h: h + delta):
            s, c = next_token_ce(adapter.model_logits(ids), ids)
        return float(s / c)

    assert loss_with(0, torch.zeros_like(hs[0])) == pytest.approx(float(loss), rel=1e-10)
    # HF eager attention takes its softmax in float32 even in a float64 model, so the
    # difference quotient carries ~1e-7 rounding: a moderate eps and a 0.1% tolerance.
    eps = 1e-3
    for layer in range(adapter.n_layers):
        update = hs[layer + 1] - hs[layer]
        fd = (loss_with(layer, eps * update) - loss_with(layer, -eps * update)) / (2 * eps)
        assert float((grads[layer] * update).sum()) == pytest.approx(fd, rel=1e-3, abs=1e-6)
    # The gradient at the final residual is the gradient through norm + W_U only.
    h_final = hs[-1].clone().requires_grad_(True)
    s, c = next_token_ce(adapter.final_logits(h_final), ids)
    (ref,) = torch.autograd.grad(s / c, h_final)
    torch.testing.assert_close(grads[-1], ref)


def test_gradient_alignment_and_random_baseline():
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny")
    batches = ids_batches(n=2)
    res = gradient_alignment(adapter, batches)
    hs, grads, _ = residual_gradients(adapter, batches[0])
    upd = (hs[1] - hs[0]).flatten(1).double()
    g = grads[0].flatten(1).double()
    ref = (upd * g).sum(-1) / (upd.norm(dim=-1) * g.norm(dim=-1))
    torch.testing.assert_close(torch.tensor(res["per_sequence_values"][0][:2],
                                            dtype=torch.float64), ref)
    base = random_cosine_quantiles(10_000, n_vectors=100)
    assert base["p05"] == pytest.approx(base["normal_p05"], rel=0.25)
    assert base["p95"] == pytest.approx(-base["normal_p05"], rel=0.25)


# ----------------------------------------------------------------------- subspace
def test_output_basis_by_size_and_energy():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    w = left @ torch.diag(sigma.double()) @ right.T
    q_out, q_int, s = output_basis(w, energy=0.6)  # 9/14.25 = 0.63 -> m = 1
    assert q_out.shape == (4, 1) and q_int.shape == (4, 3)
    torch.testing.assert_close(s, sigma)
    assert abs(float(q_out[:, 0] @ right[:, 0].float())) == pytest.approx(1.0, abs=1e-5)
    assert output_basis(w, energy=0.9)[0].shape[1] == 2  # 13/14.25 = 0.91
    q_out, q_int, _ = output_basis(w, m=3)
    full = torch.cat([q_out, q_int], 1)
    torch.testing.assert_close(full.T @ full, torch.eye(4), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        output_basis(w, m=4)
    with pytest.raises(ConfigError):
        output_basis(w)


def test_removing_a_subspace_the_unembedding_ignores_gives_zero_kl():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 8, generator=g)
    w[:, 5:] = 0  # W_U never reads coordinates 5..7
    q_out, q_int, s = output_basis(w, m=5)
    assert float(s[5:].abs().max()) < 1e-5
    x = torch.randn(64, 8, generator=g)
    kl_int, kl_out = ablation_kls(lambda z: z @ w.T, x, q_out, q_int)
    assert kl_int < 1e-9
    assert kl_out > 0.1
    torch.testing.assert_close(remove_subspace(x, q_int)[:, :5], x[:, :5], atol=1e-5, rtol=0)


def test_residual_ablation_equals_logit_lens_ablation_when_the_rest_is_identity():
    adapter = ModelAdapter(identity_from(build_tiny_model("llama"), 1), model_id="tiny")
    q_out, q_int, _ = output_basis(adapter.unembed.weight, m=8)
    batches = ids_batches()
    lens_res = lens_subspace_ablation(adapter, LogitLens.from_model(adapter), batches, q_out,
                                      q_int)
    model_res = residual_subspace_ablation(adapter, batches, q_out, q_int, [1, 2])
    for key in ("remove_internal", "remove_output"):
        torch.testing.assert_close(torch.tensor(model_res[key]),
                                   torch.tensor(lens_res[key][1:]), rtol=1e-4, atol=1e-7)
    assert min(lens_res["remove_output"][1], lens_res["remove_internal"][1]) > 1e-3


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    data = folder / "text.txt"
    data.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 4)
    return folder


def _common(folder):
    return ["--model", str(folder), "--dtype", "float32", "--data", str(folder / "text.txt"),
            "--seq-len", "16", "--batch-size", "2"]


@pytest.mark.integration
def test_cli_causal_basis(model_folder, tmp_path, capsys):
    out = tmp_path / "cbe"
    rc = main(["causal-basis", *_common(model_folder), "--tokens", "64", "--layers", "0,2",
               "-k", "3", "--steps", "5", "--tokens-per-step", "16", "--vocab-subset", "32",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "causal_basis.json").read_text())
    assert [r["layer"] for r in rep["layers"]] == [0, 2]
    assert all(len(r["model_influence"]) == 3 for r in rep["layers"])
    assert (out / "fidelity.png").stat().st_size > 0
    assert len((out / "causal_basis.csv").read_text().splitlines()) == 1 + 6
    from safetensors.torch import load_file

    assert load_file(str(out / "bases.safetensors"))["layer_2"].shape == (3, 32)
    rc = main(["causal-basis", *_common(model_folder), "--tokens", "64", "-k", "64",
               "--out", str(out)])
    assert rc == 2 and "hidden size" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_surgery(model_folder, tmp_path, capsys):
    out = tmp_path / "surg"
    rc = main(["surgery", *_common(model_folder), "--tokens", "64", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "surgery.json").read_text())
    assert len(rep["identity"]["loss"]) == 3
    assert len(rep["alignment"]["per_sequence"]) == 3
    assert (out / "surgery.png").stat().st_size > 0


@pytest.mark.integration
def test_cli_subspace(model_folder, tmp_path, capsys):
    out = tmp_path / "sub"
    rc = main(["subspace", *_common(model_folder), "--tokens", "64", "-m", "8",
               "--residual-layers", "every:2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "subspace.json").read_text())
    assert rep["m"] == 8 and len(rep["lens"]["logit"]["remove_output"]) == 3
    assert rep["residual"]["layers"] == [0, 2]
    assert (out / "subspace.png").stat().st_size > 0
    rc = main(["subspace", *_common(model_folder), "-m", "32", "--out", str(out)])
    assert rc == 2 and "between 1 and H-1" in capsys.readouterr().err
