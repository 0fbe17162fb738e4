"""Data-parallel training under torchrun (gloo, CPU): same lenses as one process, resumable.

The torchrun tests launch real processes (`torchrun --standalone --nproc-per-node 2
tests/cli_launcher.py -- train ...`, the CLI with a crash hook) on a tiny Llama saved to disk, and compare against an in-process 1-rank run over the
same global batches: rank r of 2 reads global sequences r, r+2, ..., so with token budgets
global and batch size per rank, every optimizer step of both runs sees the same sequences.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lensforge.cli.main import main
from lensforge.errors import ConfigError
from lensforge.lenses import load_lens
from lensforge.models import load_model
from lensforge.training import StepEvent, TrainConfig, train
from lensforge.training.distributed import DistContext, under_torchrun
from lensforge.training.loop import StepPlan

pytestmark = pytest.mark.integration  # lensforge as a user runs it

WORDS = [f"w{i}" for i in range(100)]
SEQ_LEN = 16
# Global budgets: 8 sequences of 16 tokens per step, 4 steps, 16 sequences of statistics.
BUDGET = dict(seq_len=SEQ_LEN, tokens_per_step=128, tokens=512, init_tokens=256, rank=4,
              lens_types=["lowrank", "tuned"], dtype="float32", checkpoint_every=1)
ATOL = 1e-5
LAUNCHER = Path(__file__).resolve().parent / "cli_launcher.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (H=32) with a word-level tokenizer saved as a folder, and a .txt corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("dist")
    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                        bos_token="<bos>", unk_token="[UNK]")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.1, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    docs = (" ".join(rng.choice(WORDS[: rng.randint(5, 100)]) for _ in range(rng.randint(5, 60)))
            for _ in range(400))
    (root / "corpus.txt").write_text("\n".join(docs))
    return root


def _config(ws: Path, out: Path, batch_size: int) -> TrainConfig:
    return TrainConfig(model=str(ws / "model"), data=str(ws / "corpus.txt"), out=str(out),
                       batch_size=batch_size, **BUDGET)


def _weights(out: Path, ws: Path) -> dict[str, dict[str, torch.Tensor]]:
    adapter = load_model(str(ws / "model"), dtype="float32", verify=False)
    return {name: load_lens(out / "lenses" / name, adapter).state_dict()
            for name in ("lora_r4", "tuned")}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n][k] - b[n][k]).abs().max()) for n in a for k in a[n])


@pytest.fixture(scope="module")
def reference(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process, batch 4 = the 2-rank run's global micro-batch (2 ranks x 2).

    Also keeps the lenses of checkpoint 2 (of 4), to compare with the killed 2-rank run.
    """
    out = tmp_path_factory.mktemp("ref") / "run"
    snapshots: dict[int, Path] = {}

    def snapshot(event: StepEvent) -> None:
        if event.checkpointed:
            snapshots[event.step] = shutil.copytree(out / "checkpoint",
                                                    out.parent / f"step{event.step}")

    adapter = load_model(str(workspace / "model"), dtype="float32")
    train(_config(workspace, out, batch_size=4), adapter, progress=False, on_step=snapshot)
    history = json.loads((out / "train_history.json").read_text())["history"]
    return {"weights": _weights(out, workspace), "history": history,
            "step2": _weights(snapshots[2], workspace),
            "step2_stream": json.loads((snapshots[2] / "state.json").read_text())["stream"]}


def _torchrun(ws: Path, out: Path, *extra: str, die_after: int | None = None,
              nproc: int = 2) -> subprocess.CompletedProcess:
    """`lensforge train` under torchrun; `die_after=k` crashes rank 0 after checkpoint k."""
    hook = [] if die_after is None else ["--die-after", str(die_after)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(LAUNCHER), *hook, "--", "train",
           "--model", str(ws / "model"), "--dtype", "float32", "--data", str(ws / "corpus.txt"),
           "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--rank", "4",
           "--lens", "lowrank", "tuned", "--tokens-per-step", "128", "--tokens", "512",
           "--init-tokens", "256", "--checkpoint-every", "1", "--no-progress",
           "--out", str(out), *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # torchrun sets these per rank
        full_env.pop(var, None)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


# ------------------------------------------------------------------ fast unit checks
@pytest.mark.unit
def test_step_plan_keeps_global_batches_on_any_world_size() -> None:
    cfg = TrainConfig(batch_size=2, seq_len=16, tokens_per_step=128, tokens=512, init_tokens=256)
    one, two, four = (StepPlan.of(cfg, w) for w in (1, 2, 4))
    assert (one.accumulation, two.accumulation, four.accumulation) == (4, 2, 1)
    assert one.total_steps == two.total_steps == four.total_steps == 4
    assert (one.init_batches, two.init_batches, four.init_batches) == (8, 4, 2)
    with pytest.raises(ConfigError, match="tokens-per-step"):
        StepPlan.of(cfg, 8)  # 8 ranks x 2 x 16 = 256 tokens > 128 per step


@pytest.mark.unit
def test_no_torchrun_means_no_dist_context(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not under_torchrun()
    assert DistContext.from_env("cpu") is None


def test_fsdp_outside_torchrun_is_a_clear_error(workspace: Path, tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    code = main(["train", "--model", str(workspace / "model"), "--data",
                 str(workspace / "corpus.txt"), "--out", str(tmp_path / "x"), "--fsdp"])
    assert code == 2
    assert "torchrun --nproc-per-node" in capsys.readouterr().err


# ------------------------------------------------------------------ torchrun, 2 ranks
def test_two_ranks_match_one_rank_and_a_killed_run_resumes_anywhere(
        workspace: Path, reference: dict, tmp_path: Path) -> None:
    """Two torchrun launches cover: 2 ranks (with FSDP2 blocks) == 1 rank over the same global
    batches; a kill after checkpoint 2 of 4; resuming on 2 ranks and on 1 rank."""
    out = tmp_path / "dp2"
    # Rank 0 dies right after checkpoint 2 of 4; torchrun then stops rank 1.
    proc = _torchrun(workspace, out, "--fsdp", die_after=2)
    assert proc.returncode != 0
    assert "fsdp: 3 blocks sharded over 2 ranks; rank 0 holds 13,920 of 27,840" in proc.stdout
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not (out / "lenses").exists()
    assert state["stream"] == reference["step2_stream"]  # same global position in the data
    mid = _weights(out / "checkpoint", workspace)
    assert _max_diff(mid, reference["step2"]) < ATOL  # 2 ranks == 1 rank, step by step
    assert _max_diff(mid, reference["weights"]) > 1e-4  # and not yet the final lens
    single = tmp_path / "resumed_on_one"
    shutil.copytree(out, single)

    proc = _torchrun(workspace, out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2/4 on 2 ranks" in proc.stdout
    assert proc.stdout.count("wrote ") == 2  # rank 0 alone reports
    assert _max_diff(_weights(out, workspace), reference["weights"]) < ATOL
    history = json.loads((out / "train_history.json").read_text())["history"]
    ref_hist = reference["history"]
    assert [h["tokens"] for h in history] == [h["tokens"] for h in ref_hist]
    for h, r in zip(history, ref_hist, strict=True):  # the logged KL is the mean over ranks
        assert h["kl_mean"]["tuned"] == pytest.approx(r["kl_mean"]["tuned"], abs=1e-5)

    # The same checkpoint on a world size of 1 (batch 2, so 4 micro-batches a step).
    adapter = load_model(str(workspace / "model"), dtype="float32")
    result = train(_config(workspace, single, batch_size=2), adapter, resume=True,
                   progress=False)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert _max_diff(_weights(single, workspace), reference["weights"]) < ATOL
