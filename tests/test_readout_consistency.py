"""One readout: every command reports the same per-layer KL for the same lens and tokens,
and the fused metrics match the slow per-layer reference."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_folder import make_tiny_model_dir, write_corpus

from lensforge.analysis.shortcuts import shortcut_analysis
from lensforge.analysis.trajectory import PredictionTrajectory
from lensforge.analysis.transfer import text_sequences
from lensforge.cli.main import main
from lensforge.evaluation import evaluate
from lensforge.lenses import LogitLens, LowRankLens, TunedLens, save_lens
from lensforge.lenses.readout import Readout, _topk_by_segments
from lensforge.metrics import LayerMetricAccumulator
from lensforge.models import load_model

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

SEQ, TOKENS = 12, 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("readout")
    model_dir = make_tiny_model_dir(base / "model")
    corpus = write_corpus(base / "corpus.txt", n_docs=80)
    adapter = load_model(str(model_dir), dtype="float32")
    torch.manual_seed(0)
    lenses = {"tuned": TunedLens.from_model(adapter),
              "lora": LowRankLens.from_model(adapter, rank=4)}
    with torch.no_grad():
        for lens in lenses.values():
            for p in lens.parameters():
                p.normal_(0, 0.1)
    for name, lens in lenses.items():
        save_lens(lens, base / name)
    return {"base": base, "model": model_dir, "corpus": corpus, "adapter": adapter,
            "lenses": lenses}


def _kl(metrics: dict, name: str) -> torch.Tensor:
    return torch.tensor(metrics[name]["kl"], dtype=torch.float64)


@pytest.mark.integration
def test_every_command_reports_the_same_per_layer_kl(setup, tmp_path) -> None:
    s = setup
    adapter, lenses = s["adapter"], s["lenses"]
    model = ["--model", str(s["model"]), "--dtype", "float32"]
    data = ["--data", str(s["corpus"]), "--seq-len", str(SEQ), "--tokens", str(TOKENS)]
    specs = [f"{n}={s['base'] / n}" for n in lenses]

    # The Python API on the windows every command reads (held-out packed sequences).
    seqs = text_sequences(adapter, str(s["corpus"]), seq_len=SEQ, max_tokens=TOKENS)
    api = evaluate(adapter, lenses, [q.ids[None] for q in seqs])

    assert main(["eval", *specs, *model, *data, "--batch-size", "1",
                 "--out", str(tmp_path / "eval")]) == 0
    eval_cli = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert main(["shortcuts", *specs, *model, *data, "--out", str(tmp_path / "sc")]) == 0
    sc_cli = json.loads((tmp_path / "sc" / "metrics.json").read_text())
    assert main(["transfer", *specs, "--native", *specs, *model, *data,
                 "--out", str(tmp_path / "tr")]) == 0
    tr_cli = json.loads((tmp_path / "tr" / "metrics.json").read_text())
    sc_api = shortcut_analysis(adapter, lenses, seqs)["full_results"]

    # show --json: per-cell KL of the trajectory, averaged over the same windows.
    traj = PredictionTrajectory.from_ids(adapter, torch.stack([q.ids for q in seqs]), lenses)
    for name in lenses:
        want = _kl(api, name)
        grids = torch.stack([t.lenses[name].stat("kl")[:-1].double() for t in traj])
        torch.testing.assert_close(grids.mean(dim=(0, 2)), want, rtol=1e-4, atol=1e-5)
        for got in (eval_cli[name], sc_cli[name], sc_api[name], tr_cli[f"{name} (B)"],
                    tr_cli[f"{name} (A)"]):
            torch.testing.assert_close(torch.tensor(got["kl"], dtype=torch.float64), want,
                                       rtol=1e-4, atol=1e-5)

    # `show --json` as a user runs it, on one window's text.
    text = adapter.tokenizer.decode(seqs[0].ids)
    out_json = tmp_path / "show.json"
    assert main(["show", text, *model, "--lens", specs[0], "--out", str(tmp_path / "s.html"),
                 "--json", str(out_json)]) == 0
    shown = json.loads(out_json.read_text())
    ids = torch.tensor(shown["input_ids"])
    direct = PredictionTrajectory.from_ids(adapter, ids, {"tuned": lenses["tuned"]})
    kl_json = torch.tensor([[float("nan") if v is None else v for v in row]
                            for row in shown["lenses"]["tuned"]["kl"]])
    torch.testing.assert_close(kl_json, direct.lenses["tuned"].stat("kl").float(),
                               rtol=0, atol=1e-4)
    per_layer = evaluate(adapter, {"tuned": lenses["tuned"]}, [ids[None]])["tuned"]["kl"]
    torch.testing.assert_close(kl_json[:-1].double().mean(1),
                               torch.tensor(per_layer, dtype=torch.float64), rtol=0, atol=1e-4)


def _reference(adapter, lenses, ids):
    """The slow path: per layer, full logits, log_softmax, the accumulator."""
    L = adapter.n_layers
    hs = adapter.hidden_states(ids)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    final = torch.log_softmax(adapter.unembed(hs[L]).double(), -1).flatten(0, 1)
    out = {}
    for name, lens in lenses.items():
        acc = LayerMetricAccumulator(L)
        acc.update_final(targets=targets.flatten(), final_logprobs=final)
        for layer in range(L):
            logits = lens(hs[layer], layer).double()
            acc.update(layer, logits.flatten(0, 1), targets=targets.flatten(),
                       final_logprobs=final)
        out[name] = acc.result()
    return out


@pytest.mark.parametrize("family", ("llama", "gemma2", "phi", "gpt2"))
def test_fused_metrics_match_the_slow_reference(family, tiny_adapter) -> None:
    adapter = tiny_adapter(family)
    torch.manual_seed(1)
    lens = TunedLens.from_model(adapter)
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.1)
    ids = torch.randint(0, adapter.vocab_size, (2, 10))
    got = evaluate(adapter, {"t": lens}, [ids], token_chunk=7)  # chunks straddle rows
    want = _reference(adapter, {"logit": LogitLens.from_model(adapter), "t": lens}, ids)
    for name in ("logit", "t"):
        for metric in ("kl", "ce", "entropy", "precision@1", "precision@5", "surprisal"):
            torch.testing.assert_close(torch.tensor(got[name][metric]),
                                       torch.tensor(want[name][metric]), rtol=1e-4, atol=1e-4,
                                       msg=f"{family} {name} {metric}")
        for key in ("model_ce", "model_entropy"):
            assert got[name][key] == pytest.approx(want[name][key], rel=1e-4, abs=1e-5)


def test_position_mask_scores_only_kept_positions(tiny_adapter) -> None:
    adapter = tiny_adapter("llama")
    ids = torch.randint(0, adapter.vocab_size, (1, 12))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 5:] = True
    masked = evaluate(adapter, {}, [(ids, mask)])["logit"]
    assert masked["n_tokens"] == [7] * adapter.n_layers
    hs = adapter.hidden_states(ids)
    lp = torch.log_softmax(adapter.unembed(hs[0]).double(), -1)[0, 5:]
    fin = torch.log_softmax(adapter.unembed(hs[-1]).double(), -1)[0, 5:]
    want = (fin.exp() * (fin - lp)).sum(-1).mean()
    assert masked["kl"][0] == pytest.approx(float(want), rel=1e-4)


def test_max_tokens_scores_exactly_that_many_tokens(tiny_adapter) -> None:
    """max_tokens is a budget, not a batch count: the last batch is cut to fit (it used
    to run whole, so --eval-tokens 1024 with 4x512 batches scored 2,048)."""
    adapter = tiny_adapter("llama")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, adapter.vocab_size, (2, 16), generator=g) for _ in range(3)]
    got = evaluate(adapter, {}, batches, max_tokens=40)["logit"]
    assert got["n_tokens"] == [40] * adapter.n_layers
    # the same numbers as scoring exactly those 40 positions with a mask
    mask = [torch.ones(2, 16, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.bool)]
    mask[1][0, :8] = True
    want = evaluate(adapter, {}, list(zip(batches[:2], mask, strict=True)))["logit"]
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-5)
    masked = evaluate(adapter, {}, [(b, torch.ones_like(b, dtype=torch.bool)) for b in batches],
                      max_tokens=40)["logit"]
    assert masked["n_tokens"] == [40] * adapter.n_layers


def test_topk_by_segments_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 64 * 80, generator=g)
    z[3, 100:105] = 9.0 + torch.arange(5.0)  # all of a row's top-5 inside one segment
    z[4, ::1000][:5] = 20.0 - torch.arange(5.0)  # spread over five segments
    got = _topk_by_segments(z, 5)
    torch.testing.assert_close(z.gather(1, got), z.topk(5, dim=-1).values)


def test_bf16_readout_stays_close_to_fp32(tiny_adapter) -> None:
    """The bf16 policy (bf16 matmul, fp32 metrics) agrees with fp32 within bf16 rounding."""
    adapter = tiny_adapter("llama")
    ids = torch.randint(0, adapter.vocab_size, (1, 16))
    hs = adapter.hidden_states(ids)
    lens = TunedLens.from_model(adapter)
    r32 = Readout(adapter.unembed, compute_dtype=torch.float32)
    r16 = Readout(adapter.unembed, compute_dtype=torch.bfloat16)
    t32, t16 = r32.target(hs[-1, 0]), r16.target(hs[-1, 0])
    x = r32.lens_states(lens, hs[:-1, 0])
    m32, m16 = r32.metrics(x, t32), r16.metrics(x, t16)
    assert (m32.kl - m16.kl).abs().max() < 0.05
    assert (m32.entropy - m16.entropy).abs().max() < 0.05
