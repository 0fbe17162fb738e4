"""PredictionTrajectory against hand-computed statistics, windows/batches/hidden states,
token display, HTML escaping, the PNG grid, and `lensforge show` / `lensforge report` end
to end on a tiny model saved with a real byte-level BPE tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lensforge.analysis.trajectory import PredictionTrajectory
from lensforge.errors import DataError, NonFiniteError, ShapeError
from lensforge.lenses import LogitLens, LowRankLens
from lensforge.viz.tokens import _byte_level_decoder, short_token, token_decoder, visible_token

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


def _lenses(adapter) -> dict:
    lora = LowRankLens.from_model(adapter, rank=4)
    with torch.no_grad():  # a lens visibly different from the logit lens
        lora.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        lora.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    return {"logit": LogitLens.from_model(adapter), "lora": lora}


@pytest.fixture
def setup(tiny_adapter):
    adapter = tiny_adapter("llama")
    ids = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(7))
    return adapter, _lenses(adapter), ids


def test_statistics_match_a_slow_reference(setup) -> None:
    adapter, lenses, ids = setup
    traj = PredictionTrajectory.from_ids(adapter, ids, lenses, top_k=5)
    L, T = adapter.n_layers, ids.numel()
    assert traj.n_rows == L + 1 and traj.n_positions == T
    assert traj.layer_labels == ["0", "1", "2", "out"]
    hs = adapter.hidden_states(ids[None])[:, 0]
    p = torch.softmax(adapter.model_logits(ids[None])[0].double(), -1)  # the model's own output
    for name, lens in lenses.items():
        grid = traj.lenses[name]
        for layer in range(L + 1):
            logits = lens(hs[layer], layer) if layer < L else adapter.final_logits(hs[L])
            q = torch.softmax(logits.double(), -1)
            ent = -(q * q.log()).sum(-1)
            kl = (p * (p.log() - q.log())).sum(-1)
            torch.testing.assert_close(grid.entropy[layer].double(), ent, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grid.kl[layer].double(), kl, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grid.max_prob[layer].double(), q.max(-1).values,
                                       atol=1e-5, rtol=1e-4)
            assert grid.top_ids[layer, :, 0].tolist() == q.argmax(-1).tolist()
            for t in range(T - 1):
                true = int(ids[t + 1])
                assert grid.rank[layer, t] == int((q[t] > q[t, true]).sum())
                assert grid.ce[layer, t].item() == pytest.approx(-q[t, true].log().item(),
                                                                  abs=1e-4)
            assert grid.rank[layer, T - 1] == -1 and torch.isnan(grid.ce[layer, T - 1])
            probs = grid.top_probs[layer]
            assert (probs[:, :-1] >= probs[:, 1:]).all()
        # the top row is the model's output, with zero KL to itself
        assert grid.kl[L].abs().max() < 1e-5
    assert not torch.equal(traj.lenses["lora"].top_ids[:L], traj.lenses["logit"].top_ids[:L])


def test_windows_batches_and_hidden_states_agree(setup) -> None:
    adapter, lenses, ids = setup
    full = PredictionTrajectory.from_ids(adapter, ids, lenses)
    windowed = PredictionTrajectory.from_ids(adapter, ids, lenses, window=6, stride=4,
                                             batch_size=3)
    # first window sees the same context as the full run
    torch.testing.assert_close(windowed.lenses["lora"].kl[:, :6], full.lenses["lora"].kl[:, :6])
    # positions 6..9 come from the window starting at 4: identical to running that slice
    part = PredictionTrajectory.from_ids(adapter, ids[4:10], lenses)
    torch.testing.assert_close(windowed.lenses["lora"].kl[:, 6:10], part.lenses["lora"].kl[:, 2:6])
    assert windowed.lenses["lora"].kl.shape == (4, 14)
    assert windowed.targets.tolist() == ids[1:].tolist() + [-1]
    # CE at the last position of a window still uses the true next token from the text
    assert not torch.isnan(windowed.lenses["lora"].ce[:, 5]).any()

    # batched sequences of different lengths (right padding) == one at a time
    seqs = [ids, ids[:5], ids[3:12]]
    batched = PredictionTrajectory.from_ids(adapter, seqs, lenses, batch_size=3)
    for seq, traj in zip(seqs, batched, strict=True):
        alone = PredictionTrajectory.from_ids(adapter, seq, lenses, batch_size=1)
        torch.testing.assert_close(traj.lenses["lora"].entropy, alone.lenses["lora"].entropy,
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(traj.lenses["lora"].top_ids, alone.lenses["lora"].top_ids)

    hs = adapter.hidden_states(ids[None])[:, 0]
    from_hs = PredictionTrajectory.from_hidden_states(hs, lenses, input_ids=ids)
    torch.testing.assert_close(from_hs.lenses["lora"].kl, full.lenses["lora"].kl)
    assert torch.equal(from_hs.lenses["logit"].rank, full.lenses["logit"].rank)
    back = PredictionTrajectory.from_dict(json.loads(json.dumps(full.to_dict())))
    assert torch.equal(back.lenses["lora"].top_ids, full.lenses["lora"].top_ids)
    torch.testing.assert_close(back.lenses["lora"].kl, full.lenses["lora"].kl, atol=1e-4, rtol=0)
    assert torch.equal(back.lenses["lora"].rank, full.lenses["lora"].rank)
    clipped = PredictionTrajectory.from_ids(adapter, ids, lenses, max_tokens=5)
    assert clipped.n_positions == 5


def test_user_mistakes_raise_clear_errors(setup) -> None:
    adapter, lenses, ids = setup
    hs = adapter.hidden_states(ids[None])[:, 0]
    with pytest.raises(ShapeError, match="pre-norm final"):
        PredictionTrajectory.from_hidden_states(hs[:-1], lenses)  # missing the final residual
    with pytest.raises(ShapeError):
        PredictionTrajectory.from_hidden_states(hs[..., :16], lenses)
    bad = hs.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        PredictionTrajectory.from_hidden_states(bad, lenses)
    with pytest.raises(DataError):
        PredictionTrajectory.from_ids(adapter, torch.tensor([], dtype=torch.long), lenses)


def test_visible_and_short_tokens() -> None:
    assert visible_token(" the\n\tx") == "␣the↵⇥x"
    assert visible_token("") == "∅"
    assert visible_token("naïve 日本語 😀") == "naïve␣日本語␣😀"
    assert visible_token("\x00a\x1b") == "\\x00a\\x1b"
    assert short_token("supercalifragilistic", 8) == "superca…"
    assert short_token(" hi", 8) == "␣hi"


def byte_level_tokenizer():
    """A real GPT-2-style byte-level BPE tokenizer (256 bytes + 3 merges + EOS), offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = {b: c for c, b in _byte_level_decoder().items()}
    vocab = {byte_to_char[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<|endoftext|>"})
    return fast


def test_byte_level_tokens_are_decoded() -> None:
    tok = byte_level_tokenizer()
    decode = token_decoder(tok)
    ids = tok("a the café")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "Ġthe" in pieces  # the raw BPE piece ...
    texts = [decode(i) for i in ids]
    assert " the" in texts  # ... is shown as the text it stands for
    # 'é' is two byte tokens; alone each is half a character: shown as escapes, not U+FFFD
    assert texts[-2:] == ["\\xc3", "\\xa9"]
    assert "".join(texts[:-2]) == "a the caf"


def test_html_is_escaped_and_self_contained(setup, tmp_path: Path) -> None:
    from lensforge.viz.html import asset_text, json_for_script, trajectory_html

    adapter, lenses, ids = setup
    traj = PredictionTrajectory.from_ids(adapter, ids, lenses)
    hostile = "</script><script>alert(1)</script><!--"
    traj.token_text[int(ids[0])] = hostile
    page = trajectory_html(traj, title="<b>t</b>", stat="kl", compare="logit")
    assert "<script>alert" not in page and "<!--" not in page
    assert "&lt;b&gt;t&lt;/b&gt;" in page
    # the data block and our own script, nothing else (the script's comments name the tag)
    assert page.count("<script") == 2 + asset_text("trajectory.js").count("<script")
    assert not re.search(r"(src|href)=[\"']?https?:", page)
    assert "Content-Security-Policy" in page and "script-src 'sha256-" in page
    block = re.search(r'<script type="application/json" class="lf-data">(.*?)</script>', page,
                      re.S).group(1)
    data = json.loads(block)
    assert data["tokens"][0] == hostile and data["stat"] == "kl" and data["compare"] == "logit"
    assert len(data["lenses"]["lora"]["top_ids"]) == traj.n_rows
    assert len(data["lenses"]["lora"]["stats"]["rank"][0]) == traj.n_positions
    assert json.loads(json_for_script({"x": "\u2028&<>"})) == {"x": "\u2028&<>"}


def test_png_grid_is_readable(setup, tmp_path: Path) -> None:
    from matplotlib.image import imread

    from lensforge.viz.grid_png import plot_trajectory_grid

    adapter, lenses, ids = setup
    traj = PredictionTrajectory.from_ids(adapter, ids, lenses)
    png = plot_trajectory_grid(traj, tmp_path / "grid.png", stat="rank", max_positions=10)
    img = imread(png)
    assert png.stat().st_size > 20_000
    assert 600 < img.shape[1] < 3000 and 300 < img.shape[0] < 2000
    assert float(img[..., :3].std()) > 0.1  # colored cells, not a blank canvas
    long = PredictionTrajectory.from_ids(adapter, torch.arange(3, 63), {"logit": lenses["logit"]})
    wide = imread(plot_trajectory_grid(long, tmp_path / "long.png", max_positions=48))
    assert wide.shape[1] < 6000  # long inputs are cut, not squeezed


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny llama with a real byte-level tokenizer, saved as a folder `--model` accepts."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_level_tokenizer()
    config = LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_cli_show_and_report(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from lensforge.cli.cmd_eval import evaluate_to_folder
    from lensforge.cli.main import main
    from lensforge.lenses import save_lens
    from lensforge.models import load_model

    adapter = load_model(str(tiny_model_dir), dtype="float32")
    lenses = _lenses(adapter)
    run = tmp_path / "run"
    save_lens(lenses["lora"], run / "train" / "lenses" / "lora_k8")

    out = tmp_path / "show.html"
    rc = main(["show", "a the <b>café</b>\n\tend", "--model", str(tiny_model_dir), "--dtype",
               "float32", "--lens", f"lora={run / 'train' / 'lenses' / 'lora_k8'}",
               "--out", str(out), "--png", str(tmp_path / "show.png"), "--stat", "max_prob"])
    assert rc == 0
    page = out.read_text(encoding="utf-8")
    data = json.loads(re.search(r'class="lf-data">(.*?)</script>', page, re.S).group(1))
    assert list(data["lenses"]) == ["logit", "lora"] and data["compare"] == "logit"
    assert "␣the" in data["tokens"] and "↵" in data["tokens"] and data["stat"] == "max_prob"
    assert (tmp_path / "show.png").stat().st_size > 10_000
    assert main(["show", "--model", str(tiny_model_dir), "--out", str(out)]) == 2  # no text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy "
                                  f"dog number {i}." for i in range(40)), encoding="utf-8")
    evaluate_to_folder(adapter, lenses, str(corpus), "text", 16, 2, 64, run, None)
    summary = {"model": adapter.describe(),
               "train_config": {"model": str(tiny_model_dir), "dtype": "float32",
                                "data": str(corpus), "k": 4},
               "timings": {"load_s": 1.5, "train_s": 2.0, "total_s": 4.25}}
    (run / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["report", str(run), "--samples", "2", "--sample-tokens", "12"]) == 0
    report = run / "report.html"
    assert str(report) in capsys.readouterr().out
    text = report.read_text(encoding="utf-8")
    assert text.count('class="lf-traj"') == 2
    assert text.count("data:image/png;base64,") >= 1
    assert "total_s" in text and "4.25" in text and "Per-layer metrics" in text
    assert not re.search(r"(src|href)=[\"']?https?:", text)

    assert main(["report", str(run), "--no-samples", "--out", str(tmp_path / "r2.html")]) == 0
    assert 'class="lf-traj"' not in (tmp_path / "r2.html").read_text(encoding="utf-8")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
