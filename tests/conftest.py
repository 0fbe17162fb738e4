"""Shared fixtures, and the test tiers.

Fixtures (tiny models come from helpers.py, which tests import for plain functions):
  tiny_model(family)    -> a fresh tiny HF causal LM (fp32, eval mode, seeded)
  tiny_adapter(family)  -> ModelAdapter around tiny_model(family)
  family                -> parametrized over TINY_FAMILIES (request it to run a test per family)
  tiny_input_ids        -> a fixed [2, 9] batch of token ids valid for every tiny model

Tiers: every test is exactly one of `unit` (library code in-process on tiny models or
plain tensors), `integration` (the CLI, subprocesses, torchrun, a browser or a cached real
model) or `slow` (real models, long runs; off unless asked for with -m slow). A module sets
its tier with `pytestmark`; a test may override it with its own marker. See
`pytest_collection_modifyitems` below and README's Testing section.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import SEED, TINY_FAMILIES, VOCAB, build_tiny_model
from torch import nn

from lensforge.models import ModelAdapter

TIERS = ("unit", "integration", "slow")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: it must see each test's single tier
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test exactly one tier marker: the closest one (its own, else its class's,
    else its module's). Markers otherwise add up, so a CLI test marked `integration` in a
    `unit` module would run under both `-m unit` and `-m integration`; and a test with no
    tier would run under neither, so that is an error."""
    untiered, tier_of = [], {}
    for item in items:
        closest = next((m for m in item.iter_markers() if m.name in TIERS), None)
        if closest is None:
            untiered.append(item.nodeid)
        tier_of[item] = closest
    if untiered:
        raise pytest.UsageError(
            f"tests without a tier marker ({', '.join(TIERS)}); set `pytestmark` in the "
            f"module: {', '.join(untiered[:5])}{' ...' if len(untiered) > 5 else ''}")
    for item, mark in tier_of.items():
        for node in item.listchain():  # drop inherited tier markers, then pin the closest
            node.own_markers[:] = [m for m in node.own_markers if m.name not in TIERS]
        item.own_markers.append(mark)


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """Factory: tiny_model(family, seed=0) -> a fresh tiny HF causal LM."""
    return build_tiny_model


@pytest.fixture
def tiny_adapter() -> Callable[..., ModelAdapter]:
    """Factory: tiny_adapter(family="llama", seed=0) -> ModelAdapter of a fresh tiny model."""

    def make(family: str = "llama", seed: int = SEED) -> ModelAdapter:
        return ModelAdapter(build_tiny_model(family, seed), model_id=f"tiny-{family}")

    return make


@pytest.fixture(params=TINY_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Every tiny family in turn."""
    return request.param


@pytest.fixture
def tiny_input_ids() -> torch.Tensor:
    """[2, 9] token ids, valid for every tiny model (VOCAB = 128)."""
    gen = torch.Generator().manual_seed(123)
    return torch.randint(3, VOCAB, (2, 9), generator=gen)
