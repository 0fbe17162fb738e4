"""Metric functions, accumulator, report I/O and per-layer plots, against slow references."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from lensforge.errors import DataError
from lensforge.metrics.accumulator import LayerMetricAccumulator
from lensforge.metrics.agreement import precision_at_k, surprisal, target_rank, top2_gap
from lensforge.metrics.divergence import cross_entropy, entropy, kl_divergence
from lensforge.metrics.fidelity import relative_alignment_fidelity
from lensforge.metrics.report_io import (
    read_layer_metrics,
    read_layer_metrics_csv,
    write_layer_metrics,
)
from lensforge.viz.curves import lens_color, lens_colors, plot_layer_curves

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _kl_reference(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """fp64 explicit sum over the vocabulary, row by row."""
    p_rows = torch.softmax(p_logits.double(), -1).reshape(-1, p_logits.shape[-1])
    q_rows = torch.softmax(q_logits.double(), -1).reshape(-1, q_logits.shape[-1])
    out = []
    for p, q in zip(p_rows.tolist(), q_rows.tolist(), strict=True):
        out.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))
    return torch.tensor(out, dtype=torch.float64).reshape(p_logits.shape[:-1])


# ---------------------------------------------------------------- divergence


def test_kl_two_token_hand_computed() -> None:
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q).item() == pytest.approx(expected, abs=1e-6)
    # Asymmetric: KL(q||p) is a different number.
    expected_rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(q, p).item() == pytest.approx(expected_rev, abs=1e-6)


def test_kl_matches_fp64_reference_with_leading_dims(gen: torch.Generator) -> None:
    p = torch.randn(3, 4, 17, generator=gen) * 3
    q = torch.randn(3, 4, 17, generator=gen) * 3
    got = kl_divergence(p, q)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.double(), _kl_reference(p, q), rtol=1e-5, atol=1e-6)
    # Logits and log-probs give the same answer.
    torch.testing.assert_close(kl_divergence(torch.log_softmax(p, -1), q), got)


def test_kl_self_is_zero_and_zero_mass_is_safe(gen: torch.Generator) -> None:
    x = torch.randn(5, 11, generator=gen)
    torch.testing.assert_close(kl_divergence(x, x), torch.zeros(5), atol=1e-6, rtol=0)
    # p puts zero mass on a token where q is also zero: no NaN, the term is 0.
    p = torch.tensor([0.0, -math.inf, -math.inf])
    q = torch.tensor([math.log(0.9), math.log(0.1), -math.inf])
    out = kl_divergence(p, q)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(-math.log(0.9), abs=1e-6)
    # q misses mass that p has: infinite, not NaN.
    assert kl_divergence(q, p).item() == math.inf


def test_kl_bf16_computed_in_fp32(gen: torch.Generator) -> None:
    p = torch.randn(4, 50, generator=gen).bfloat16()
    q = torch.randn(4, 50, generator=gen).bfloat16()
    got = kl_divergence(p, q)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), _kl_reference(p.float(), q.float()), rtol=1e-5, atol=1e-6
    )


def test_entropy_hand_computed(gen: torch.Generator) -> None:
    assert entropy(torch.zeros(4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy(torch.tensor([0.0, -math.inf])).item() == pytest.approx(0.0, abs=1e-7)
    probs = torch.tensor([0.7, 0.2, 0.1])
    expected = -sum(p * math.log(p) for p in probs.tolist())
    assert entropy(probs.log()).item() == pytest.approx(expected, abs=1e-6)
    x = torch.randn(2, 3, 9, generator=gen)
    assert entropy(x).shape == (2, 3)


def test_cross_entropy_matches_torch(gen: torch.Generator) -> None:
    logits = torch.randn(2, 6, 13, generator=gen)
    targets = torch.randint(0, 13, (2, 6), generator=gen)
    got = cross_entropy(logits, targets)
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 13), targets.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(got, ref.reshape(2, 6))
    two = torch.tensor([0.25, 0.75]).log()
    assert cross_entropy(two, torch.tensor(1)).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    with pytest.raises(ValueError, match="targets shape"):
        cross_entropy(logits, targets[:, :3])


# ---------------------------------------------------------------- agreement


def _precision_reference(q: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    q_rows, p_rows = q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])
    out = []
    for qr, pr in zip(q_rows.tolist(), p_rows.tolist(), strict=True):
        q_top = set(sorted(range(len(qr)), key=lambda i: -qr[i])[:k])
        p_top = set(sorted(range(len(pr)), key=lambda i: -pr[i])[:k])
        out.append(len(q_top & p_top) / k)
    return torch.tensor(out).reshape(q.shape[:-1])


@pytest.mark.parametrize("k", [1, 2, 5, 20])
def test_precision_at_k_matches_set_reference(gen: torch.Generator, k: int) -> None:
    q = torch.randn(4, 8, 20, generator=gen)
    # p correlated with q so overlaps are neither all-0 nor all-1.
    p = q + 0.8 * torch.randn(4, 8, 20, generator=gen)
    got = precision_at_k(q, p, k)
    assert got.shape == (4, 8)
    torch.testing.assert_close(got, _precision_reference(q, p, k))
    assert 0.0 < got.mean().item() <= 1.0


def test_precision_at_k_hand_computed() -> None:
    q = torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0])
    p = torch.tensor([5.0, 0.0, 3.0, 4.0, 0.0])
    assert precision_at_k(q, p, 1).item() == 1.0
    assert precision_at_k(q, p, 2).item() == 0.5  # {0,1} vs {0,3}
    assert precision_at_k(q, p, 3).item() == pytest.approx(2 / 3)  # {0,1,2} vs {0,3,2}
    assert precision_at_k(q, p, 5).item() == 1.0
    with pytest.raises(ValueError):
        precision_at_k(q, p, 6)


def test_surprisal_hand_computed_and_reference(gen: torch.Generator) -> None:
    q = torch.tensor([0.1, 3.0, 0.2])  # argmax = 1
    p = torch.tensor([0.5, 0.25, 0.25]).log()
    assert surprisal(q, p).item() == pytest.approx(math.log(4), abs=1e-6)
    q = torch.randn(3, 7, 10, generator=gen)
    p = torch.randn(3, 7, 10, generator=gen)
    p_lp = torch.log_softmax(p.double(), -1)
    ref = torch.tensor(
        [[-p_lp[i, j, int(q[i, j].argmax())].item() for j in range(7)] for i in range(3)]
    )
    torch.testing.assert_close(surprisal(q, p).double(), ref.double(), rtol=1e-5, atol=1e-6)


def test_target_rank_reference(gen: torch.Generator) -> None:
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert target_rank(logits, torch.tensor([1])).tolist() == [0]
    assert target_rank(logits, torch.tensor([0])).tolist() == [3]
    assert target_rank(logits, torch.tensor([2])).tolist() == [2]
    x = torch.randn(5, 30, generator=gen)
    t = torch.randint(0, 30, (5,), generator=gen)
    order = x.argsort(dim=-1, descending=True)
    ref = [order[i].tolist().index(int(t[i])) for i in range(5)]
    assert target_rank(x, t).tolist() == ref


def test_top2_gap_hand_computed() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0]])
    got = top2_gap(probs.log())
    torch.testing.assert_close(got, torch.tensor([0.3, 0.0]), atol=1e-6, rtol=0)
    # Accepts logits: softmax of (log 3, 0) = (0.75, 0.25).
    assert top2_gap(torch.tensor([math.log(3.0), 0.0])).item() == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- fidelity


def test_raf_known_vectors() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 0.5])
    b = torch.tensor([1.5, 1.0, 3.0, 0.0])
    assert relative_alignment_fidelity(a, b) == pytest.approx((0.5 + 1.0 + 0.0 + 0.5) / 4)
    assert relative_alignment_fidelity(a, a) == 0.0
    assert isinstance(relative_alignment_fidelity(a, b), float)
    with pytest.raises(ValueError):
        relative_alignment_fidelity(a, b[:3])


# ---------------------------------------------------------------- accumulator


def _direct(lens: torch.Tensor, final: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Direct fp64 computation over all tokens at once."""
    q, p = lens.double(), final.double()
    kl = _kl_reference(p, q)
    return {
        "kl": kl.mean().item(),
        "ce": cross_entropy(q, targets).mean().item(),
        "entropy": entropy(q).mean().item(),
        "precision@1": _precision_reference(q, p, 1).mean().item(),
        "precision@5": _precision_reference(q, p, 5).mean().item(),
        "surprisal": surprisal(q, p).mean().item(),
    }


def test_accumulator_equals_direct_over_concatenated_batches(gen: torch.Generator) -> None:
    n_layers, vocab = 3, 12
    batches = []
    for n in (5, 9, 4):
        final = torch.randn(n, vocab, generator=gen) * 2
        lenses = [
            final + (n_layers - layer) * torch.randn(n, vocab, generator=gen)
            for layer in range(n_layers)
        ]
        targets = torch.randint(0, vocab, (n,), generator=gen)
        batches.append((lenses, final, targets))

    acc = LayerMetricAccumulator(n_layers)
    for i, (lenses, final, targets) in enumerate(batches):
        final_lp = torch.log_softmax(final, -1)
        for layer, lens in enumerate(lenses):
            if i % 2 == 0:  # exercise both the precomputed and the raw path
                acc.update(layer, lens, targets=targets, final_logprobs=final_lp)
            else:
                acc.update(layer, lens, final, targets)
        acc.update_final(final, targets)
    res = acc.result()

    final_all = torch.cat([b[1] for b in batches])
    targets_all = torch.cat([b[2] for b in batches])
    for layer in range(n_layers):
        lens_all = torch.cat([b[0][layer] for b in batches])
        ref = _direct(lens_all, final_all, targets_all)
        for name, value in ref.items():
            assert res[name][layer] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, layer)
        assert res["ppl"][layer] == pytest.approx(math.exp(ref["ce"]), rel=1e-5)
    assert res["n_tokens"] == [18, 18, 18]
    assert res["model_n_tokens"] == 18
    assert res["model_ce"] == pytest.approx(
        cross_entropy(final_all, targets_all).mean().item(), rel=1e-5
    )
    assert res["model_entropy"] == pytest.approx(entropy(final_all).mean().item(), rel=1e-5)
    assert res["model_ppl"] == pytest.approx(math.exp(res["model_ce"]))
    assert res["mean"]["kl"] == pytest.approx(sum(res["kl"]) / n_layers)
    # Noisier lenses at early layers are further from the final distribution.
    assert res["kl"][0] > res["kl"][2]
    json.dumps(res, allow_nan=False)  # JSON-able python values only


def test_accumulator_mask_ignore_index_and_bf16(gen: torch.Generator) -> None:
    vocab = 10
    final = torch.randn(2, 6, vocab, generator=gen)
    lens = final + torch.randn(2, 6, vocab, generator=gen)
    targets = torch.randint(0, vocab, (2, 6), generator=gen)
    targets[0, 0] = -100  # HF ignore index: skipped for CE only
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding: skipped for everything

    acc = LayerMetricAccumulator(1)
    acc.update(0, lens.bfloat16(), final.bfloat16(), targets, mask)
    res = acc.result()

    keep = mask.reshape(-1)
    q = lens.bfloat16().float().reshape(-1, vocab)[keep]
    p = final.bfloat16().float().reshape(-1, vocab)[keep]
    t = targets.reshape(-1)[keep]
    assert res["n_tokens"] == [10]
    assert res["kl"][0] == pytest.approx(_kl_reference(p, q).mean().item(), rel=1e-5)
    assert res["ce"][0] == pytest.approx(
        cross_entropy(q[t >= 0], t[t >= 0]).mean().item(), rel=1e-5
    )
    assert res["model_ce"] is None and res["model_n_tokens"] == 0


def test_accumulator_empty_layers_and_errors() -> None:
    acc = LayerMetricAccumulator(2)
    acc.update(0, torch.zeros(3, 6), torch.zeros(3, 6))
    res = acc.result()
    assert res["kl"] == [pytest.approx(0.0, abs=1e-7), None]
    assert res["ce"] == [None, None] and res["ppl"] == [None, None]
    assert res["precision@1"][0] == 1.0
    with pytest.raises(IndexError):
        acc.update(2, torch.zeros(3, 6), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(0, torch.zeros(3, 6), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="final_logits or final_logprobs"):
        acc.update(0, torch.zeros(3, 6))


# ---------------------------------------------------------------- report I/O


def _fake_results() -> dict[str, dict]:
    out = {}
    for name, scale in (("logit", 4.0), ("tuned", 1.0), ("lora_k32", 1.2)):
        kl = [scale * math.exp(-0.4 * layer) + 0.01 for layer in range(8)]
        out[name] = {
            "layers": list(range(8)),
            "kl": kl,
            "ce": [3.0 + k for k in kl],
            "entropy": [2.0 + 0.5 * k for k in kl],
            "precision@1": [min(1.0, 0.1 * layer + 0.2) for layer in range(8)],
            "n_tokens": [100] * 8,
            "mean": {"kl": sum(kl) / 8},
            "model_ce": 2.9,
            "model_entropy": 2.1,
            "model_ppl": math.exp(2.9),
        }
    out["tuned"]["kl"][3] = None
    return out


def test_report_json_csv_round_trip(tmp_path) -> None:
    results = _fake_results()
    json_path, csv_path = write_layer_metrics(results, tmp_path / "eval")
    assert json_path.name == "metrics.json" and csv_path.name == "metrics.csv"
    assert read_layer_metrics(tmp_path / "eval") == results

    rows = read_layer_metrics_csv(tmp_path / "eval")
    with csv_path.open() as f:
        assert next(csv.reader(f)) == ["lens", "layer", "metric", "value"]
    by_key = {(r["lens"], r["layer"], r["metric"]): r["value"] for r in rows}
    for lens, res in results.items():
        for layer, v in enumerate(res["kl"]):
            assert by_key[(lens, str(layer), "kl")] == v  # exact: repr round-trips floats
        assert by_key[(lens, "", "model_ce")] == 2.9
        assert by_key[(lens, "mean", "kl")] == res["mean"]["kl"]
    assert by_key[("tuned", "3", "kl")] is None
    # 3 lenses x (5 per-layer metrics x 8 layers + 1 mean + 3 scalars)
    assert len(rows) == 3 * (5 * 8 + 1 + 3)


def test_report_non_finite_becomes_null_and_missing_dir_errors(tmp_path) -> None:
    write_layer_metrics({"x": {"layers": [0], "kl": [math.nan], "model_ppl": math.inf}}, tmp_path)
    assert read_layer_metrics(tmp_path) == {"x": {"layers": [0], "kl": [None], "model_ppl": None}}
    with pytest.raises(DataError, match="not found"):
        read_layer_metrics(tmp_path / "nowhere")


# ---------------------------------------------------------------- plots


def test_lens_colors() -> None:
    assert lens_color("logit") == lens_color("logit_lens") == "#7f7f7f"
    assert lens_color("tuned") == "#1f77b4"
    assert lens_color("lora_k32") == lens_color("lora_k32")
    for name in ("lora", "lora_k4", "lora_k64", "LoRA-r16"):
        r, g, b = (int(lens_color(name)[i : i + 2], 16) for i in (1, 3, 5))
        assert r > g and r > b, name  # orange/red family
    colors = lens_colors(
        ["lora_k4", "lora_k16", "lora_k32", "lora_k64", "lora_a", "lora_b", "tuned"]
    )
    loras = [c for n, c in colors.items() if n != "tuned"]
    assert len(set(loras)) == len(loras)
    assert lens_color("my_lens") not in {"#7f7f7f", "#1f77b4"}


def _png_stats(path) -> tuple[tuple[int, ...], float]:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.shape, float(img[..., :3].var())


def test_plot_layer_curves_writes_non_blank_png(tmp_path) -> None:
    results = _fake_results()
    path = plot_layer_curves(results, tmp_path / "plots" / "curves.png", title="test")
    assert path.exists() and path.stat().st_size > 10_000
    shape, variance = _png_stats(path)
    # 2x2 grid at 150 dpi: about 1560 x 1140 pixels.
    assert 800 < shape[0] < 2000 and 1000 < shape[1] < 2500
    assert variance > 1e-3  # not a blank canvas

    single = plot_layer_curves(results, tmp_path / "kl.png", metrics=("kl",))
    shape1, var1 = _png_stats(single)
    assert shape1[1] < shape[1] and var1 > 1e-3


def test_plot_kl_log_scale_only_when_wide_range(tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    scales: list[str] = []
    monkeypatch.setattr(plt, "close", lambda fig: scales.append(fig.axes[0].get_yscale()))
    wide = {"a": {"layers": [0, 1, 2], "kl": [10.0, 1.0, 0.001]}}
    narrow = {"a": {"layers": [0, 1, 2], "kl": [2.0, 1.0, 0.5]}}
    plot_layer_curves(wide, tmp_path / "w.png", metrics=("kl",))
    plot_layer_curves(narrow, tmp_path / "n.png", metrics=("kl",))
    assert scales == ["log", "linear"]
