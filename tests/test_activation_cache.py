"""Activation cache: bf16 round trip, replay, disk cost, and model mismatch."""

from __future__ import annotations

import pytest
import torch

from lensforge.errors import DataError, LensMismatchError, ShapeError
from lensforge.training.activation_cache import (
    ActivationCache,
    ActivationCacheWriter,
    bytes_per_token,
    write_cache,
)

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


def _batches(vocab: int, n: int = 3, shape: tuple[int, int] = (2, 7)):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, shape, generator=gen) for _ in range(n)]


def test_round_trip_equals_bf16_states(tiny_adapter, tmp_path) -> None:
    adapter = tiny_adapter("llama")
    batches = _batches(adapter.vocab_size)
    info = write_cache(tmp_path / "c", adapter, batches, max_tokens=10**6)
    assert info.n_tokens == 3 * 14
    cache = ActivationCache(tmp_path / "c", adapter)
    assert cache.disk_bytes() == len(cache) * bytes_per_token(adapter.n_layers,
                                                              adapter.hidden_size)
    got = list(cache.batches(tokens_per_batch=5))
    layer_h = torch.cat([g[0] for g in got], 1)
    final_h = torch.cat([g[1] for g in got], 0)
    ids = torch.cat([g[2] for g in got])
    want = torch.cat([adapter.hidden_states(b).flatten(1, 2) for b in batches], 1)
    L = adapter.n_layers
    assert layer_h.dtype == torch.bfloat16
    assert torch.equal(layer_h, want[:L].bfloat16())
    assert torch.equal(final_h, want[L].bfloat16())
    assert torch.equal(ids, torch.cat([b.flatten() for b in batches]))
    # Replay is repeatable (a second epoch reads the same values).
    again = torch.cat([g[0] for g in cache.batches(tokens_per_batch=64)], 1)
    assert torch.equal(again, layer_h)


def test_max_tokens_and_errors(tiny_adapter, tmp_path) -> None:
    adapter = tiny_adapter("llama")
    info = write_cache(tmp_path / "c", adapter, _batches(adapter.vocab_size), max_tokens=14)
    assert info.n_tokens == 14
    with pytest.raises(DataError, match="already holds"):
        ActivationCacheWriter.for_adapter(tmp_path / "c", adapter)
    with pytest.raises(DataError, match="not a finished"):
        ActivationCache(tmp_path / "missing")
    with pytest.raises(LensMismatchError):
        ActivationCache(tmp_path / "c", tiny_adapter("llama", seed=5))
    writer = ActivationCacheWriter.for_adapter(tmp_path / "d", adapter)
    with pytest.raises(ShapeError):
        writer.append(torch.zeros(2, 1, 3, adapter.hidden_size), torch.zeros(1, 3))
    with pytest.raises(DataError, match="no data"):
        write_cache(tmp_path / "e", adapter, [], max_tokens=10)


def test_disk_cost_formula() -> None:
    assert bytes_per_token(30, 576) == 31 * 576 * 2 + 4  # SmolLM2-135M: ~35.7 kB/token
