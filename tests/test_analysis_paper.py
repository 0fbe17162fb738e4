"""The LoRA-Lens paper's analyses against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import perturbed_copy

from lensforge.analysis.early_exit_eval import (
    ExitRecords,
    calm_threshold,
    collect_exit_records,
    exit_stats,
    first_exit_layer,
)
from lensforge.analysis.memory import (
    PUBLISHED_CONFIGS,
    config_dims,
    lens_memory,
    lens_parameter_count,
    measure_training_memory,
    memory_table,
    reduction_percent,
)
from lensforge.analysis.shortcuts import first_layer_above, shortcut_metrics
from lensforge.analysis.spectrum import (
    components_for_energy,
    effective_rank,
    energy_ratio,
    lens_spectrum,
    participation_ratio,
    spectral_metrics,
)
from lensforge.analysis.transfer import EvalSequence, transfer_eval
from lensforge.errors import ConfigError, LensMismatchError
from lensforge.lenses import LowRankLens, TunedLens
from lensforge.models import ModelAdapter

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


# ------------------------------------------------------------------ spectrum
@pytest.mark.parametrize("r", [1, 3, 10])
def test_flat_spectrum_of_rank_r(r: int) -> None:
    sv = torch.cat([torch.full((r,), 2.5), torch.zeros(20 - r)])
    assert effective_rank(sv) == pytest.approx(r)
    assert participation_ratio(sv) == pytest.approx(r)
    # top ⌊20/2⌋ = 10 components hold everything when r <= 10
    assert energy_ratio(sv) == pytest.approx(1.0)
    assert components_for_energy(sv, 0.9) == math.ceil(0.9 * r)


def test_known_spectrum_by_hand() -> None:
    sv = torch.tensor([3.0, 1.0, 0.0, 0.0])  # given unsorted below, too
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(sv[[1, 0, 2, 3]]) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    # energy 9 + 1 = 10; top 2 of 4 components hold 10/10; top 1 holds 9/10
    assert energy_ratio(sv, 0.5) == pytest.approx(1.0)
    assert energy_ratio(sv, 0.25) == pytest.approx(0.9)
    assert components_for_energy(sv, 0.9) == 1
    assert components_for_energy(sv, 0.95) == 2
    assert participation_ratio(sv) == pytest.approx(100 / 82)
    assert p.sum() == 1


def test_spectrum_edge_cases() -> None:
    zero = torch.zeros(5)
    assert spectral_metrics(zero) == {"effective_rank": 0.0, "energy_top_half": 0.0,
                                      "components_90": 0, "participation_ratio": 0.0, "n": 5}
    with pytest.raises(ValueError):
        effective_rank(torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError):
        effective_rank(torch.zeros(0))


def test_lens_spectrum_of_known_translators(tiny_adapter) -> None:
    adapter = tiny_adapter("llama")
    H = adapter.hidden_size
    tuned = TunedLens.from_model(adapter)
    lora = LowRankLens.from_model(adapter, rank=4)
    with torch.no_grad():
        tuned.weight[0] = torch.eye(H)  # flat, full rank
        tuned.weight[1] = torch.diag(torch.tensor([1.0] * 8 + [0.0] * (H - 8)))
        tuned.weight[2] = 0.0
        lora.up.normal_()
    res = lens_spectrum(tuned)
    assert res["effective_rank"] == pytest.approx([H, 8, 0], abs=1e-6)
    assert res["participation_ratio"] == pytest.approx([H, 8, 0], abs=1e-6)
    assert res["mean"]["effective_rank"] == pytest.approx((H + 8) / 3)
    assert res["effective_rank_over_h"] == pytest.approx((H + 8) / 3 / H)
    low = lens_spectrum(lora)
    # A·B has rank 4: no more than 4 non-negligible singular values, all layers
    for layer_sv in low["singular_values"]:
        assert sum(s > 1e-6 * layer_sv[0] for s in layer_sv) == 4
    assert all(1 <= e <= 4 + 1e-6 for e in low["effective_rank"])


# -------------------------------------------------------------------- memory
def test_memory_of_a_known_config() -> None:
    # H = 4096, L = 32, k = 32 -> r = 128 (the paper's "about 94% fewer" example)
    H, L = 4096, 32
    full = lens_memory(H, L, "tuned", optimizer="adamw")
    low = lens_memory(H, L, "lowrank", k=32, optimizer="adamw")
    assert full["parameters"] == 32 * (4096 * 4096 + 4096) == 537_001_984
    assert low["rank"] == 128
    assert low["parameters"] == 32 * (2 * 4096 * 128 + 4096) == 33_685_504
    assert full["param_bytes"] == full["grad_bytes"] == 4 * 537_001_984
    assert full["optimizer_bytes"] == 8 * 537_001_984  # two fp32 moments
    assert full["total_bytes"] == 16 * 537_001_984
    sgd = lens_memory(H, L, "tuned", optimizer="sgd")
    assert sgd["optimizer_bytes"] == 4 * 537_001_984 and sgd["total_bytes"] == 12 * 537_001_984
    assert reduction_percent(full["total_bytes"], low["total_bytes"]) == pytest.approx(
        100 * (1 - 33_685_504 / 537_001_984))
    assert lens_parameter_count(10, 2, "lowrank", 3, bias=False) == 2 * 60
    with pytest.raises(ConfigError):
        lens_memory(H, L, "tuned", optimizer="lion")


def test_memory_table_and_published_configs() -> None:
    assert PUBLISHED_CONFIGS["Llama-3-70B"] == (8192, 80)
    assert PUBLISHED_CONFIGS["Llama-3.1-405B"] == (16384, 126)
    rows = memory_table({"m": (64, 2)}, k=8, optimizers=("adamw", "sgd"))
    assert [r["optimizer"] for r in rows] == ["adamw", "sgd"]
    assert rows[0]["rank"] == 8
    # params: full 2*(4096+64) = 8320, low 2*(2*64*8+64) = 2176
    assert rows[0]["reduction_percent"]["param_bytes"] == pytest.approx(100 * (1 - 2176 / 8320))
    big = memory_table({"405B": PUBLISHED_CONFIGS["Llama-3.1-405B"]})[0]
    assert big["reduction_percent"]["total_bytes"] > 93


def test_config_dims_from_hf_configs(tmp_path) -> None:
    (tmp_path / "a.json").write_text('{"hidden_size": 576, "num_hidden_layers": 30}')
    assert config_dims(tmp_path / "a.json") == (576, 30)
    assert config_dims({"n_embd": 768, "n_layer": 12}) == (768, 12)
    nested = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "num_hidden_layers": 34}}
    assert config_dims(nested) == (2560, 34)
    with pytest.raises(ConfigError):
        config_dims({"vocab_size": 5})
    with pytest.raises(ConfigError):
        config_dims(tmp_path / "missing.json")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_measured_state_bytes_match_computed(tiny_adapter, tiny_input_ids, optimizer) -> None:
    adapter = tiny_adapter("llama")
    H, L = adapter.hidden_size, adapter.n_layers
    for lens_type, rank in (("tuned", None), ("lowrank", 4)):
        m = measure_training_memory(adapter, tiny_input_ids, lens_type, rank=rank,
                                    optimizer=optimizer)
        c = lens_memory(H, L, lens_type, rank=rank, optimizer=optimizer)
        assert m["parameters"] == c["parameters"]
        assert m["param_bytes"] == c["param_bytes"]
        assert m["grad_bytes"] == c["grad_bytes"]
        # AdamW also keeps one 4-byte step counter per parameter tensor (weights, bias)
        extra = 4 * (3 if lens_type == "lowrank" else 2) if optimizer == "adamw" else 0
        assert m["optimizer_bytes"] == c["optimizer_bytes"] + extra


# ---------------------------------------------------------------- early exit
def test_calm_threshold_by_hand() -> None:
    assert float(calm_threshold(0.0, 0, 10)) == pytest.approx(0.1)
    assert float(calm_threshold(1.0, 0, 10)) == pytest.approx(1.0)
    assert float(calm_threshold(0.5, 5, 10)) == pytest.approx(0.45 + 0.1 * math.exp(-2))
    with pytest.raises(ValueError):
        calm_threshold(0.5, 1, 0)


def test_first_exit_layer_by_hand() -> None:
    gaps = torch.tensor([[0.1, 0.6, 0.9], [0.0, 0.0, 0.0], [0.8, 0.2, 0.9]])
    thr = torch.tensor([0.5, 0.5, 0.5])
    assert first_exit_layer(gaps, thr).tolist() == [1, 3, 0]
    assert first_exit_layer(gaps, thr, min_layer=1).tolist() == [1, 3, 2]
    # strictly greater: a gap equal to the threshold does not exit
    assert first_exit_layer(torch.tensor([[0.5, 0.5]]), torch.tensor([0.5])).tolist() == [2]


def test_exit_stats_by_hand() -> None:
    # 4 tokens, 4 layers, N large so the threshold is ~0.9·λ + 0.1
    gaps = torch.tensor([
        [0.0, 0.5, 0.9, 0.9],   # λ=0.5 (thr 0.55): exits at 2
        [0.6, 0.9, 0.9, 0.9],   # exits at 0
        [0.0, 0.0, 0.0, 0.0],   # never
        [0.0, 0.0, 0.0, 0.7],   # exits at 3
    ], dtype=torch.float64)
    top1 = torch.tensor([[9, 9, 5, 5], [7, 7, 7, 7], [1, 1, 1, 1], [0, 0, 0, 4]])
    final = torch.tensor([5, 8, 1, 4])  # token 1's exit top-1 (7) is wrong
    rec = ExitRecords(gaps, top1, final, torch.zeros(4, dtype=torch.float64), avg_len=1e9)
    s = exit_stats(rec, 0.5)
    assert s["exit_rate"] == pytest.approx(3 / 4)
    assert s["exit_precision"] == pytest.approx(2 / 3)
    assert s["agreement"] == pytest.approx(3 / 4)
    # skipped fractions: (4-2)/4, (4-0)/4, 0, (4-3)/4
    assert s["layers_skipped"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.25) / 4)
    assert s["mean_exit_layer"] == pytest.approx(5 / 3)
    none = exit_stats(rec, 1.0)  # threshold 1.0: nothing exits
    assert none["exit_rate"] == 0 and math.isnan(none["exit_precision"])
    assert none["agreement"] == 1.0 and none["layers_skipped"] == 0


def test_collect_exit_records_matches_direct_computation(tiny_adapter, tiny_input_ids) -> None:
    adapter = tiny_adapter("llama")
    lens = TunedLens.from_model(adapter)
    with torch.no_grad():
        lens.weight.normal_(std=0.05)
    seqs = [EvalSequence(tiny_input_ids[0], 3, 4), EvalSequence(tiny_input_ids[1], 0, 9)]
    rec = collect_exit_records(adapter, lens, seqs, token_chunk=2)
    assert rec.gaps.shape == (6 + 9, adapter.n_layers)
    assert rec.avg_len == pytest.approx(6.5)
    assert rec.steps[:6].tolist() == [0, 1, 2, 3, 4, 5]
    hs = adapter.hidden_states(tiny_input_ids[1:2])[:, 0]
    with torch.no_grad():
        probs = torch.softmax(lens(hs[1], 1), -1)
    top2 = probs.topk(2, -1).values
    assert torch.allclose(rec.gaps[6:, 1], (top2[:, 0] - top2[:, 1]).double(), atol=1e-5)
    assert rec.final_top1[6:].tolist() == adapter.unembed(hs[-1]).argmax(-1).tolist()


# ------------------------------------------------------------ transfer & co
def test_transfer_of_identical_model_has_zero_raf(tiny_adapter, tiny_input_ids) -> None:
    a = tiny_adapter("llama")
    lens = TunedLens.from_model(a)
    with torch.no_grad():
        lens.weight.normal_(std=0.05)
    b_same = ModelAdapter(a.model, model_id="same")
    b_other = ModelAdapter(perturbed_copy(a.model, 0.2), model_id="other")
    seqs = [EvalSequence(ids, 0, 9) for ids in tiny_input_ids]
    same = transfer_eval(b_same, {"tuned": lens}, {"tuned": lens}, seqs)
    assert same["reference"] == "tuned (B)"
    assert same["raf"]["tuned (A)"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(LensMismatchError):
        TunedLens.from_model(a).bind(b_other)  # unembedding hash differs
    moved = TunedLens.from_model(a).bind(b_other, allow_mismatch=True)
    native = TunedLens.from_model(b_other)
    other = transfer_eval(b_other, {"tuned": moved}, {"tuned": native}, seqs)
    assert other["raf"]["tuned (A)"] == pytest.approx(0.0, abs=1e-9)  # both zero translators
    assert other["raf"]["logit"] == pytest.approx(0.0, abs=1e-9)


def test_shortcut_metrics_differences_by_hand() -> None:
    res = {
        "tuned": {"layers": [0, 1], "precision@1": [0.5, 1.0], "precision@5": [0.6, 1.0],
                  "surprisal": [2.0, 0.0], "n_tokens": [10, 10],
                  "mean": {"precision@1": 0.75, "precision@5": 0.8, "surprisal": 1.0}},
        "lora": {"layers": [0, 1], "precision@1": [0.3, 0.9], "precision@5": [0.6, 0.8],
                 "surprisal": [3.0, 0.5], "n_tokens": [10, 10],
                 "mean": {"precision@1": 0.6, "precision@5": 0.7, "surprisal": 1.75}},
    }
    out = shortcut_metrics(res, "tuned")
    d = out["mean_abs_difference"]["lora"]
    assert d["precision@1"] == pytest.approx(0.15)
    assert d["precision@5"] == pytest.approx(0.1)
    assert d["surprisal"] == pytest.approx(0.75)
    assert first_layer_above([0.1, 0.85, 0.9], 0.8) == 1
    assert first_layer_above([0.1], 0.8) is None


def test_evaluate_sequences_matches_evaluate(tiny_adapter, tiny_input_ids) -> None:
    from lensforge.analysis.transfer import evaluate_sequences
    from lensforge.evaluation import evaluate

    adapter = tiny_adapter("llama")
    lens = TunedLens.from_model(adapter)
    with torch.no_grad():
        lens.weight.normal_(std=0.05)
    ours = evaluate_sequences(adapter, {"t": lens}, [EvalSequence(i, 0, 9) for i in tiny_input_ids])
    ref = evaluate(adapter, {"t": lens}, [tiny_input_ids])
    for name in ("logit", "t"):
        for metric in ("kl", "ce", "precision@1", "surprisal"):
            assert ours[name][metric] == pytest.approx(ref[name][metric], rel=1e-5, abs=1e-6)
    # from position 4 on: 5 of 9 positions per sequence
    tail = evaluate_sequences(adapter, {"t": lens}, [EvalSequence(i, 4, 5) for i in tiny_input_ids])
    assert tail["t"]["n_tokens"] == [10] * adapter.n_layers
