"""The early-exit decoder as a state object: prefill + step() is what generate() runs, and the
exit policy is an object the decoder asks at each check."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model

from lensforge.early_exit import CalmPolicy, EarlyExitDecoder, generate
from lensforge.early_exit.families import resolve
from lensforge.errors import ConfigError
from lensforge.lenses import LogitLens
from lensforge.models import ModelAdapter

pytestmark = pytest.mark.unit  # library code on tiny models and plain data

IDS = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(4))


class Recording:
    """A policy that never exits and records every (step, layer) it is asked about."""

    patience = 0

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def threshold(self, step: int, layer: int) -> float:
        self.asked.append((step, layer))
        return float("inf")


def test_prefill_and_steps_equal_generate():
    adapter = ModelAdapter(build_tiny_model("qwen3"), model_id="tiny-qwen3")
    lens = LogitLens.from_model(adapter)
    ref = generate(adapter, lens, IDS, 8, lam=0.1, stop_tokens=())
    dec = EarlyExitDecoder(adapter, resolve(adapter), lens=lens, checks=range(1, 3),
                           policy=CalmPolicy(0.1, IDS.shape[1]))
    dec.prefill(IDS)
    while len(dec.tokens) < 8:
        dec.step()
    assert dec.tokens == ref.tokens and dec.exit_layers == ref.exit_layers
    assert dec.n_checks == ref.n_checks and dec.pos == IDS.shape[1] + 7


def test_step_before_prefill_is_an_error():
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama")
    with pytest.raises(RuntimeError, match="prefill"):
        EarlyExitDecoder(adapter, resolve(adapter)).step()


def test_the_policy_is_asked_at_each_check_of_each_step():
    adapter = ModelAdapter(build_tiny_model("llama"), model_id="tiny-llama")
    lens = LogitLens.from_model(adapter)
    policy = Recording()
    res = generate(adapter, lens, IDS, 5, lam=0.0, policy=policy, stop_tokens=())
    assert policy.asked == [(step, j) for step in range(1, 5) for j in (1, 2)]
    assert res.exit_rate == 0.0 and res.settings["policy"] == "Recording"
    ref = generate(adapter, None, IDS, 5, lam=None, stop_tokens=())
    assert res.tokens == ref.tokens  # a policy that never exits: the model's own decoding
    with pytest.raises(ConfigError, match="needs a lens"):
        generate(adapter, None, IDS, 4, lam=None, policy=policy)


def test_calm_policy_thresholds():
    p = CalmPolicy(0.5, 10.0, {2: 0.8})
    assert p.threshold(0, 1) == pytest.approx(0.55) and p.threshold(0, 2) == 0.8
    with pytest.raises(ConfigError):
        CalmPolicy(1.5, 10.0)
    with pytest.raises(ConfigError):
        CalmPolicy(0.5, 10.0, patience=-1)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generation_uses_no_deprecated_keyword(family):
    """transformers 5.x deprecates `past_key_values` (removed in 5.40): the decoder calls
    the model and its layers with whatever keyword they name, so nothing warns."""
    import warnings

    adapter = ModelAdapter(build_tiny_model(family), model_id=f"tiny-{family}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        res = generate(adapter, LogitLens.from_model(adapter), IDS, 4, lam=0.0, stop_tokens=())
    assert len(res.tokens) == 4
