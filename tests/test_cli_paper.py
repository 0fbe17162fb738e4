"""End to end, as a user runs them: every paper-analysis subcommand on a tiny saved model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import VOCAB, build_tiny_model, perturbed_copy
from tokenizers import Tokenizer, models, pre_tokenizers

from lensforge.cli.main import main

pytestmark = pytest.mark.integration  # lensforge as a user runs it

WORDS = ("the cat sat on a mat and dog ran to park with big red ball while bird sang "
         "in tree under blue sky at noon").split()


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model A, its sibling B (perturbed copy), a text file and instructions."""
    root = tmp_path_factory.mktemp("paper_cli")
    tok = _tokenizer()
    model = build_tiny_model("llama")
    paths = {"a": root / "model_a", "b": root / "model_b"}
    for key, m in (("a", model), ("b", perturbed_copy(model, 0.05))):
        m.save_pretrained(paths[key])
        tok.save_pretrained(paths[key])
    lines = [" ".join(WORDS[(i * 7) % len(WORDS):] + WORDS[: (i * 7) % len(WORDS)])
             for i in range(60)]
    paths["text"] = root / "text.txt"
    paths["text"].write_text("\n\n".join(lines))
    paths["instructions"] = root / "outputs.json"
    paths["instructions"].write_text(json.dumps(
        [{"instruction": " ".join(WORDS[i: i + 6])} for i in range(0, 20, 2)]))
    paths["root"] = root
    return paths


def _run(*argv: str) -> None:
    assert main(list(argv)) == 0


def _csv_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep_out(workspace: dict[str, Path]) -> Path:
    out = workspace["root"] / "sweep"
    _run("sweep", "--model", str(workspace["a"]), "--dtype", "float32",
         "--data", str(workspace["text"]), "--eval-data", str(workspace["text"]),
         "--seq-len", "16", "--batch-size", "2", "--ks", "4", "16",
         "--init-tokens", "128", "--tokens", "32", "--tokens-per-step", "32",
         "--eval-tokens", "64", "--no-progress", "--out", str(out))
    return out


def test_sweep(sweep_out: Path) -> None:
    summary = json.loads((sweep_out / "sweep.json").read_text())
    rows = {r["lens"]: r for r in summary["rows"]}
    assert set(rows) == {"logit", "tuned", "lora_k4", "lora_k16"}
    assert rows["lora_k4"]["rank"] == 8 and rows["lora_k16"]["rank"] == 2
    assert rows["tuned"]["parameters"] == 3 * (32 * 32 + 32)
    assert rows["lora_k4"]["parameters"] == 3 * (2 * 32 * 8 + 32)
    assert rows["tuned"]["raf"] == 0.0 and rows["lora_k4"]["raf"] >= 0
    assert len(_csv_rows(sweep_out / "sweep.csv")) == 4
    assert set(json.loads((sweep_out / "metrics.json").read_text())) == set(rows)
    for png in ("raf_vs_params.png", "kl_per_layer.png"):
        assert (sweep_out / png).stat().st_size > 0
    for name in ("tuned", "lora_k4", "lora_k16"):
        assert (sweep_out / "train" / "lenses" / name / "config.json").exists()


def test_spectrum(sweep_out: Path, tmp_path: Path) -> None:
    lenses = sweep_out / "train" / "lenses"
    _run("spectrum", str(lenses / "tuned"), f"r8={lenses / 'lora_k4'}", "--out", str(tmp_path))
    res = json.loads((tmp_path / "spectrum.json").read_text())
    assert set(res) == {"tuned", "r8"}
    assert len(res["tuned"]["effective_rank"]) == 3
    assert all(0 < e <= 8 + 1e-6 for e in res["r8"]["effective_rank"])
    assert res["r8"]["rank"] == 8
    rows = _csv_rows(tmp_path / "spectrum.csv")
    assert {r["metric"] for r in rows} == {"effective_rank", "energy_top_half",
                                           "components_90", "participation_ratio"}
    assert (tmp_path / "spectrum.png").stat().st_size > 0


def test_spectrum_refuses_the_logit_lens(tmp_path: Path) -> None:
    assert main(["spectrum", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2


def test_memory(workspace: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "my.json"
    cfg.write_text('{"n_embd": 1024, "n_layer": 24}')
    _run("memory", "--config", f"mine={cfg}", "-k", "32", "--measure", "--measure-tokens", "16",
         "--model", str(workspace["a"]), "--dtype", "float32", "--out", str(tmp_path))
    res = json.loads((tmp_path / "memory.json").read_text())
    models = {r["model"] for r in res["computed"]}
    assert {"mine", "Llama-3-70B", "Llama-3.1-405B", "OLMo-2-32B"} <= models
    mine = next(r for r in res["computed"] if r["model"] == "mine" and r["optimizer"] == "adamw")
    assert mine["tuned"]["parameters"] == 24 * (1024 * 1024 + 1024)
    assert mine["lowrank"]["parameters"] == 24 * (2 * 1024 * 32 + 1024)
    measured = {(m["lens_type"], m["optimizer"]): m for m in res["measured"]}
    assert measured["tuned", "adamw"]["param_bytes"] == 4 * 3 * (32 * 32 + 32)
    assert measured["lowrank", "sgd"]["optimizer_bytes"] == 4 * 3 * (2 * 32 * 1 + 32)
    assert any(r["source"] == "measured" for r in _csv_rows(tmp_path / "memory.csv"))
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_memory_bad_config_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"vocab_size": 3}')
    assert main(["memory", "--config", str(bad), "--out", str(tmp_path)]) == 2
    assert "hidden size" in capsys.readouterr().err


def test_transfer(workspace: dict[str, Path], sweep_out: Path, tmp_path: Path) -> None:
    from lensforge.lenses import TunedLens, save_lens
    from lensforge.models import load_model

    lenses = sweep_out / "train" / "lenses"
    # B's "native" lens: an untrained (zero) tuned lens, i.e. the logit lens of B.
    save_lens(TunedLens.from_model(load_model(str(workspace["b"]))), tmp_path / "native")
    _run("transfer", f"tuned={lenses / 'tuned'}", f"lora={lenses / 'lora_k4'}",
         "--native", f"tuned={tmp_path / 'native'}", "--model", str(workspace["b"]),
         "--dtype", "float32", "--instructions", str(workspace["instructions"]),
         "--n-instructions", "4", "--new-tokens", "3", "--out", str(tmp_path))
    res = json.loads((tmp_path / "transfer.json").read_text())
    assert res["reference"] == "tuned (B)"
    assert res["raf"]["logit"] == pytest.approx(0.0, abs=1e-6)  # zero tuned lens == logit
    assert res["raf"]["tuned (A)"] > 0  # A's trained lens differs from it on B
    assert set(res["raf"]) == {"logit", "tuned (A)", "lora (A)"}
    assert res["transferred_from"]["tuned"].endswith("model_a")
    assert "4 instructions" in res["data"]
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "transfer_kl.png").exists()


def test_transfer_refuses_other_shapes(workspace: dict[str, Path], tmp_path: Path) -> None:
    from lensforge.lenses import LensConfig, TunedLens, save_lens

    wrong = TunedLens(LensConfig("tuned", n_layers=3, hidden_size=16))
    save_lens(wrong, tmp_path / "wrong")
    assert main(["transfer", str(tmp_path / "wrong"), "--model", str(workspace["b"]),
                 "--dtype", "float32", "--data", str(workspace["text"]),
                 "--out", str(tmp_path / "o")]) == 2


def test_shortcuts(workspace: dict[str, Path], sweep_out: Path, tmp_path: Path) -> None:
    lenses = sweep_out / "train" / "lenses"
    _run("shortcuts", str(lenses / "tuned"), str(lenses / "lora_k4"), "--allow-mismatch",
         "--model", str(workspace["b"]), "--dtype", "float32",
         "--data", str(workspace["text"]), "--seq-len", "16", "--tokens", "64",
         "--out", str(tmp_path))
    res = json.loads((tmp_path / "shortcuts.json").read_text())
    assert set(res["lenses"]) == {"logit", "tuned", "lora_k4"}
    assert res["reference"] == "tuned"
    for lens in res["lenses"].values():
        assert len(lens["precision@1"]) == 3
        assert all(0 <= p <= 1 for p in lens["precision@5"])
        assert lens["n_tokens"] == 64
    assert set(res["mean_abs_difference"]) == {"logit", "lora_k4"}
    assert (tmp_path / "shortcuts.png").stat().st_size > 0


def test_early_exit(workspace: dict[str, Path], sweep_out: Path, tmp_path: Path) -> None:
    lenses = sweep_out / "train" / "lenses"
    _run("early-exit", str(lenses / "lora_k4"), "--model", str(workspace["a"]),
         "--dtype", "float32", "--instructions", str(workspace["instructions"]),
         "--n-instructions", "3", "--new-tokens", "4", "--lambdas", "5", "--out", str(tmp_path))
    res = json.loads((tmp_path / "early_exit.json").read_text())
    assert set(res["curves"]) == {"logit", "lora_k4"}
    curve = res["curves"]["lora_k4"]
    assert [c["lambda"] for c in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # per prompt: the prompt's last position + up to 4 generated tokens (EOS may stop early)
    n = curve[0]["n_tokens"]
    assert 3 <= n <= 15 and all(c["n_tokens"] == n for c in curve)
    rates = [c["exit_rate"] for c in curve]
    assert rates == sorted(rates, reverse=True)  # a higher threshold never exits more
    assert curve[-1]["exit_rate"] == 0.0 and curve[-1]["exit_precision"] is None
    assert len(_csv_rows(tmp_path / "early_exit.csv")) == 10
    assert (tmp_path / "early_exit.png").stat().st_size > 0
