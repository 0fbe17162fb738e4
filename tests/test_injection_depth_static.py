"""Injection detection, prediction depth and static analysis: known answers on tiny models,
slow references, and one end-to-end CLI run per subcommand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_tiny_model, char_tokenizer

from lensforge.analysis.depth import depth_study, prediction_depth
from lensforge.analysis.injection import (
    anomaly_scores,
    answer_token_ids,
    auroc_with_ci,
    detect_injections,
    multiple_choice_pairs,
)
from lensforge.analysis.static import (
    block_weights,
    coherence,
    lens_logits_of_vectors,
    ov_matrices,
    parameter_vectors,
    static_study,
    top_tokens,
)
from lensforge.cli.main import main
from lensforge.errors import ConfigError, UnsupportedModelError
from lensforge.lenses import LogitLens, TunedLens, save_lens
from lensforge.models import ModelAdapter

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


@pytest.fixture(scope="module")
def char_adapter() -> ModelAdapter:
    return ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama", tokenizer=char_tokenizer())


# ------------------------------------------------------------------ injection detection
def test_auroc_separable_is_one_and_identical_is_half() -> None:
    auc, low, high = auroc_with_ci(np.arange(20.0), np.arange(100.0, 120.0), n_boot=200)
    assert (auc, low, high) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    auc, low, high = auroc_with_ci(rng.normal(size=1000), rng.normal(size=1000), n_boot=200)
    assert abs(auc - 0.5) < 0.05 and low < auc < high and 0.03 < high - low < 0.12
    # Reversed scores: AUROC 0, so the direction of the score matters.
    assert auroc_with_ci(np.arange(100.0, 120.0), np.arange(20.0), n_boot=10)[0] == 0.0


def test_rank_auroc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    from lensforge.analysis.injection import _rank_auroc

    rng = np.random.default_rng(2)
    neg, pos = rng.integers(0, 5, (3, 30)).astype(float), rng.integers(1, 6, (3, 20)).astype(float)
    labels = np.r_[np.zeros(30), np.ones(20)]
    ref = [roc_auc_score(labels, np.r_[neg[i], pos[i]]) for i in range(3)]  # with ties
    np.testing.assert_allclose(_rank_auroc(neg, pos), ref)


@pytest.mark.parametrize("method", ["iforest", "lof", "mahalanobis"])
def test_detectors_flag_shifted_points(method: str) -> None:
    rng = np.random.default_rng(1)
    train, clean = rng.normal(size=(200, 6)), rng.normal(size=(100, 6))
    shifted = rng.normal(size=(100, 6)) + 6.0
    scores = anomaly_scores(train, np.concatenate([clean, shifted]), method=method)
    assert auroc_with_ci(scores[:100], scores[100:], n_boot=10)[0] > 0.99
    same = anomaly_scores(train, np.concatenate([clean, rng.normal(size=(100, 6))]), method=method)
    assert abs(auroc_with_ci(same[:100], same[100:], n_boot=10)[0] - 0.5) < 0.15


def test_prompt_pairs_are_paired_and_answerable() -> None:
    pairs = multiple_choice_pairs(40, seed=3)
    assert pairs == multiple_choice_pairs(40, seed=3)
    for p in pairs:
        assert p.clean.endswith("Answer:") and p.injected.endswith("Answer:")
        assert p.injected.startswith(p.clean.removesuffix("Answer:"))
        assert p.correct != p.target and len(set(p.options)) == 4
        assert "ABCD"[p.target] in p.injected.splitlines()[-2]
    with pytest.raises(ConfigError):
        multiple_choice_pairs(0)


def test_detect_injections_runs_on_tiny_model(char_adapter: ModelAdapter) -> None:
    ids = answer_token_ids(char_adapter.tokenizer)
    assert len(set(ids)) == 4
    tuned = TunedLens.from_model(char_adapter)
    with torch.no_grad():
        tuned.weight.normal_(0, 0.05)
    pairs = multiple_choice_pairs(16, seed=0)
    res = detect_injections(char_adapter, {"logit": LogitLens.from_model(char_adapter),
                                           "tuned": tuned}, pairs, n_boot=20, batch_size=5)
    assert {(r["features"], r["detector"]) for r in res["rows"]} == {
        ("logit", "iforest"), ("logit", "lof"), ("tuned", "iforest"), ("tuned", "lof"),
        ("final_hidden", "mahalanobis")}
    for r in res["rows"]:
        assert 0 <= r["ci_low"] <= r["auroc"] <= r["ci_high"] <= 1
        assert len(res["scores"][f"{r['features']}/{r['detector']}"]["clean"]) == 8


def test_answer_fast_path_matches_full_vocab(char_adapter: ModelAdapter) -> None:
    from lensforge.analysis.injection import last_position_states, trajectory_features

    ids = answer_token_ids(char_adapter.tokenizer)
    states = last_position_states(char_adapter, ["Question: 1+1?\nAnswer:", "Hello there"])
    lens = TunedLens.from_model(char_adapter)
    with torch.no_grad():
        lens.weight.normal_(0, 0.1)
    fast = trajectory_features(lens, char_adapter, states, features="answer", answer_ids=ids)
    full = trajectory_features(lens, char_adapter, states, features="both", answer_ids=ids)
    L1 = char_adapter.n_layers + 1
    np.testing.assert_allclose(fast.reshape(2, L1, 4), full.reshape(2, L1, 6)[..., :4],
                               rtol=1e-5, atol=1e-5)


def test_last_position_states_ignore_padding(char_adapter: ModelAdapter) -> None:
    from lensforge.analysis.injection import last_position_states

    texts = ["Question: 2+2?\nAnswer:", "Hi", "A much longer prompt than the others."]
    batched = last_position_states(char_adapter, texts, batch_size=3)
    single = torch.cat([last_position_states(char_adapter, [t]) for t in texts], dim=1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------- prediction depth
def slow_depth(top1: list[int], final: int) -> int:
    for layer in range(len(top1)):
        if all(t == final for t in top1[layer:]):
            return layer
    return len(top1)


def test_prediction_depth_hand_built_and_reference() -> None:
    a, b = 5, 7
    cases = {(a, b, a, a): 2, (a, a, a, a): 0, (b, b, b, b): 4, (a, a, a, b): 4, (b, a, b, a): 3}
    for seq, expected in cases.items():
        got = prediction_depth(torch.tensor(seq)[:, None], torch.tensor([a]))
        assert got.tolist() == [expected], seq
    gen = torch.Generator().manual_seed(0)
    top1 = torch.randint(0, 3, (6, 4, 25), generator=gen)
    final = torch.randint(0, 3, (4, 25), generator=gen)
    depth = prediction_depth(top1, final)
    for i in range(4):
        for j in range(25):
            assert depth[i, j] == slow_depth(top1[:, i, j].tolist(), int(final[i, j]))


def test_depth_study_final_layer_identity(tiny_adapter) -> None:
    adapter = tiny_adapter("llama")
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(3, 128, (2, 12), generator=gen) for _ in range(3)]
    res = depth_study(adapter, {"logit": LogitLens.from_model(adapter)}, batches, max_tokens=40)
    tokens = res["tokens"]
    assert res["info"]["n_tokens"] == 44 and res["info"]["n_examples"] == 4  # stops after 2 batches
    depth = tokens["depth/logit"]
    assert depth.min() >= 0 and depth.max() <= adapter.n_layers
    # Reference for the loss: the model's own logits.
    logits = adapter.model_logits(batches[0]).float()[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), batches[0][:, 1:].reshape(-1),
                                            reduction="none")
    np.testing.assert_allclose(tokens["loss"][:22], ref.numpy(), rtol=1e-4, atol=1e-5)
    assert -1 <= res["summary"]["logit"]["spearman_token"] <= 1


# ---------------------------------------------------------------------- static analysis
def test_coherence_known_values() -> None:
    same = torch.ones(10, 4)
    assert torch.allclose(coherence(torch.tensor([[0, 1, 2]]), same), torch.tensor([1.0]))
    ortho = torch.eye(6)
    assert torch.allclose(coherence(torch.tensor([[0, 1, 2, 3]]), ortho), torch.tensor([0.0]))
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: (0,1)=0, (0,2)=(1,2)=1/sqrt2 -> mean 2/(3 sqrt2)
    assert torch.allclose(coherence(torch.tensor([[0, 1, 2]]), emb),
                          torch.tensor([2 / (3 * 2**0.5)]))
    with pytest.raises(ConfigError):
        coherence(torch.tensor([[0]]), emb)


def test_planted_vector_ranks_its_token_first(tiny_adapter) -> None:
    adapter = tiny_adapter("llama")
    token, neuron, layer = 17, 5, 1
    with torch.no_grad():
        adapter.unembed.norm.weight.fill_(1.0)
        adapter.unembed.weight[token] *= 4.0  # make w_t the clear argmax of w_s . w_t
        w_t = adapter.unembed.weight[token].clone()
        adapter.layers[layer].mlp.down_proj.weight[:, neuron] = w_t
    vecs, labels = parameter_vectors(adapter, layer, "mlp_out")
    assert labels[neuron] == f"L{layer}.mlp.{neuron}"
    logit = LogitLens.from_model(adapter)
    top = top_tokens(lens_logits_of_vectors(logit, adapter, vecs, layer + 1), 5)
    assert top[neuron, 0] == token
    # A tuned lens: plant v = (I + A)^-1 w_t; a large bias must be ignored (linear part only).
    tuned = TunedLens.from_model(adapter)
    with torch.no_grad():
        tuned.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        tuned.bias.fill_(50.0)
        A = tuned.weight[layer + 1]
        v = torch.linalg.solve(torch.eye(32) + A, w_t)
    top = top_tokens(lens_logits_of_vectors(tuned, adapter, v[None], layer + 1), 1)
    assert top.item() == token
    res = static_study(adapter, {"logit": logit, "tuned": tuned}, [layer], top_k=4, max_vectors=None)
    assert {r["kind"] for r in res["rows"]} == {"mlp_out", "ov_out", "ov_in"}
    assert all(-1 <= r["coherence_real"] <= 1 for r in res["rows"])


def test_ov_matrices_match_repeat_kv_reference(tiny_adapter) -> None:
    adapter = tiny_adapter("llama")  # 4 heads, 2 kv heads
    w = block_weights(adapter, 0)
    attn = adapter.layers[0].self_attn
    d = w.d_head
    wv = attn.v_proj.weight.reshape(w.n_kv_heads, d, -1).repeat_interleave(2, dim=0)
    for h in range(w.n_heads):
        ref = attn.o_proj.weight[:, h * d:(h + 1) * d] @ wv[h]
        torch.testing.assert_close(ov_matrices(w)[h], ref)


def test_block_weights_every_family(tiny_adapter, family: str) -> None:
    adapter = tiny_adapter(family)
    for kind in ("mlp_out", "ov_out", "ov_in"):
        vecs, labels = parameter_vectors(adapter, adapter.n_layers - 1, kind, n_singular=2)
        assert vecs.shape[1] == adapter.hidden_size and len(labels) == len(vecs)
        assert torch.isfinite(vecs).all()


def test_fused_value_split_matches_modules(tiny_adapter) -> None:
    """gpt2 c_attn and gpt-neox query_key_value: the value part reproduces the value path."""
    gpt2 = tiny_adapter("gpt2")
    w = block_weights(gpt2, 0)
    attn = gpt2.layers[0].attn
    x = torch.randn(3, 32)
    v_ref = attn.c_attn(x)[:, 64:] - attn.c_attn.bias[64:]
    torch.testing.assert_close(x @ w.w_v.T, v_ref, atol=1e-5, rtol=1e-4)
    neox = tiny_adapter("gpt_neox")
    w = block_weights(neox, 0)
    qkv = neox.layers[0].attention.query_key_value
    out = (qkv(x) - qkv.bias).reshape(3, 4, 3 * 8)[..., 16:].reshape(3, 32)
    torch.testing.assert_close(x @ w.w_v.T, out, atol=1e-5, rtol=1e-4)


def test_missing_parts_give_clear_error(tiny_adapter) -> None:
    adapter = tiny_adapter("llama")
    adapter.layers[0].mlp.down_proj = torch.nn.Identity()
    adapter.layers[0].mlp.renamed = torch.nn.Linear(64, 32)
    del adapter.layers[0].mlp.down_proj
    with pytest.raises(UnsupportedModelError, match="MLP output projection"):
        block_weights(adapter, 0)


# ----------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny", tokenizer=char_tokenizer())
    tuned = TunedLens.from_model(adapter)
    with torch.no_grad():
        tuned.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    lens_dir = save_lens(tuned, folder.parent / "tuned_lens")
    return folder, lens_dir


@pytest.mark.integration
def test_cli_detect(model_folder: tuple[Path, Path], tmp_path: Path) -> None:
    folder, lens = model_folder
    out = tmp_path / "detect"
    rc = main(["detect", f"tuned={lens}", "--model", str(folder), "--dtype", "float32",
               "--n", "14", "--bootstrap", "20", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "detect.json").read_text())
    assert {r["features"] for r in data["rows"]} == {"logit", "tuned", "final_hidden"}
    assert (out / "detect.csv").read_text().startswith("features,detector,auroc")
    assert (out / "detect.png").stat().st_size > 1000


@pytest.mark.integration
def test_cli_depth(model_folder: tuple[Path, Path], tmp_path: Path) -> None:
    folder, lens = model_folder
    out = tmp_path / "depth"
    rc = main(["depth", f"tuned={lens}", "--model", str(folder), "--dtype", "float32",
               "--tokens", "200", "--seq-len", "32", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "depth.json").read_text())
    assert set(data["summary"]) == {"logit", "tuned"} and data["info"]["n_tokens"] >= 200
    header = (out / "depth_tokens.csv").read_text().splitlines()[0]
    assert header == "loss,correct,example,token,depth_logit,depth_tuned"
    assert (out / "depth.png").stat().st_size > 1000


@pytest.mark.integration
def test_cli_static(model_folder: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    folder, lens = model_folder
    out = tmp_path / "static"
    rc = main(["static", f"tuned={lens}", "--model", str(folder), "--dtype", "float32",
               "--top-k", "5", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "static.json").read_text())
    assert data["info"]["layers"] == [0, 1, 2] and len(data["rows"]) == 2 * 3 * 3
    assert (out / "static.png").stat().st_size > 1000
    assert main(["static", "--model", str(folder), "--dtype", "float32", "--layers", "9",
                 "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err
