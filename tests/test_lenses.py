"""Lens types, their parameter counts, save/load, tuned-lens interop and checkpoint errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import HIDDEN, N_LAYERS, VOCAB
from torch import Tensor, nn

from lensforge.errors import CheckpointError, ConfigError, LensMismatchError, ShapeError
from lensforge.lenses import (
    Lens,
    LensConfig,
    LogitLens,
    LowRankLens,
    TunedLens,
    export_tuned_lens,
    import_tuned_lens,
    load_lens,
    resolve_rank,
    save_lens,
)
from lensforge.lenses import io as lens_io
from lensforge.models import ModelAdapter
from lensforge.storage import atomic_dir

pytestmark = pytest.mark.unit  # library code on tiny models and plain data


def randomize(lens: Lens, seed: int = 0) -> Lens:
    """Give every lens parameter a random value (a trained-looking lens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lens.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return lens


def all_layer_logits(lens: Lens, hs: Tensor) -> Tensor:
    """Logits of `lens` at every layer 0..L-1 from hidden states [L+1, B, T, H]."""
    with torch.no_grad():
        return torch.stack([lens(hs[i], i) for i in range(lens.n_layers)])


@pytest.fixture
def adapter(tiny_adapter) -> ModelAdapter:
    return tiny_adapter("llama")


@pytest.fixture
def hidden(adapter: ModelAdapter, tiny_input_ids: Tensor) -> Tensor:
    return adapter.hidden_states(tiny_input_ids)


# ------------------------------------------------------------------ zero init
@pytest.mark.parametrize("family_name", ["llama", "gemma2", "gpt2", "phi"])
def test_fresh_lenses_equal_logit_lens(
    tiny_adapter, tiny_input_ids: Tensor, family_name: str
) -> None:
    adapter = tiny_adapter(family_name)
    hs = adapter.hidden_states(tiny_input_ids)
    logit = all_layer_logits(LogitLens.from_model(adapter), hs)
    for lens in (TunedLens.from_model(adapter), LowRankLens.from_model(adapter, k=4)):
        assert lens.num_parameters() > 0
        assert torch.equal(all_layer_logits(lens, hs), logit)
        assert torch.equal(lens.transform_all(hs[:N_LAYERS]), hs[:N_LAYERS])


def test_lowrank_down_projection_is_random_but_up_is_zero(adapter: ModelAdapter) -> None:
    lens = LowRankLens.from_model(adapter, k=4)
    assert torch.count_nonzero(lens.up) == 0
    assert torch.count_nonzero(lens.down) == lens.down.numel()
    assert torch.count_nonzero(lens.bias) == 0


# ----------------------------------------------------------------- transforms
@pytest.mark.parametrize("cls", [TunedLens, LowRankLens])
def test_transform_all_equals_per_layer(adapter: ModelAdapter, hidden: Tensor, cls: type) -> None:
    kwargs = {"k": 4} if cls is LowRankLens else {}
    lens = randomize(cls.from_model(adapter, **kwargs))
    hs = hidden[:N_LAYERS]
    batched = lens.transform_all(hs)
    per_layer = torch.stack([lens.transform_hidden(hs[i], i) for i in range(N_LAYERS)])
    torch.testing.assert_close(batched, per_layer)
    assert not torch.allclose(batched, hs, atol=1e-3)  # the random lens really moves h


def test_tuned_lens_math_matches_definition(adapter: ModelAdapter, hidden: Tensor) -> None:
    lens = randomize(TunedLens.from_model(adapter))
    h, layer = hidden[1], 1
    expected_h = h + h @ lens.weight[layer].T + lens.bias[layer]
    torch.testing.assert_close(lens.transform_hidden(h, layer), expected_h)
    with torch.no_grad():
        torch.testing.assert_close(lens(h, layer), adapter.final_logits(expected_h))


def test_lowrank_lens_math_matches_definition(adapter: ModelAdapter, hidden: Tensor) -> None:
    lens = randomize(LowRankLens.from_model(adapter, rank=3))
    h, layer = hidden[2], 2
    A, B = lens.up[layer], lens.down[layer]  # [H, r], [r, H]
    expected_h = h + h @ (A @ B).T + lens.bias[layer]
    torch.testing.assert_close(lens.transform_hidden(h, layer), expected_h)
    torch.testing.assert_close(lens.translator_matrix(layer), A @ B)


# ----------------------------------------------------------------- rank rules
@pytest.mark.parametrize(
    ("hidden_size", "k", "expected"),
    [(32, 4, 8), (100, 32, 3), (64, None, 2), (33, 5, 6), (7, 1, 7)],
)
def test_rank_is_floor_h_over_k(hidden_size: int, k: int | None, expected: int) -> None:
    assert resolve_rank(hidden_size, None, k) == expected
    config = LensConfig(lens_type="lowrank", n_layers=2, hidden_size=hidden_size)
    lens = LowRankLens(config, k=k)
    assert lens.rank == expected == lens.config.rank
    assert lens.up.shape == (2, hidden_size, expected)
    assert lens.down.shape == (2, expected, hidden_size)


@pytest.mark.parametrize(
    ("rank", "k"), [(HIDDEN + 1, None), (0, None), (None, 0), (None, -3), (None, HIDDEN + 1)]
)
def test_bad_rank_raises_config_error(rank: int | None, k: int | None) -> None:
    config = LensConfig(lens_type="lowrank", n_layers=2, hidden_size=HIDDEN)
    with pytest.raises(ConfigError):
        LowRankLens(config, rank=rank, k=k)


def test_explicit_rank_overrides_k() -> None:
    config = LensConfig(lens_type="lowrank", n_layers=2, hidden_size=HIDDEN)
    assert LowRankLens(config, rank=HIDDEN, k=4).rank == HIDDEN


@pytest.mark.parametrize(("n_layers", "hidden_size", "rank"), [(3, 32, 4), (5, 64, 2), (1, 10, 10)])
def test_parameter_counts(n_layers: int, hidden_size: int, rank: int) -> None:
    config = dict(n_layers=n_layers, hidden_size=hidden_size)
    lowrank = LowRankLens(LensConfig(lens_type="lowrank", **config), rank=rank)
    tuned = TunedLens(LensConfig(lens_type="tuned", **config))
    logit = LogitLens(LensConfig(lens_type="logit", **config))
    H, r = hidden_size, rank
    assert lowrank.num_parameters() == n_layers * (2 * H * r + H)
    assert tuned.num_parameters() == n_layers * (H * H + H)
    assert logit.num_parameters() == 0
    no_bias = TunedLens(LensConfig(lens_type="tuned", bias=False, **config))
    assert no_bias.num_parameters() == n_layers * H * H


# ------------------------------------------------------------------ shapes
def test_wrong_hidden_width_raises_clear_shape_error(adapter: ModelAdapter) -> None:
    lens = TunedLens.from_model(adapter)
    with pytest.raises(ShapeError, match=rf"width 16 .*expects {HIDDEN}"):
        lens.transform_hidden(torch.randn(2, 16), 0)
    with pytest.raises(ShapeError, match=rf"width 16 .*expects {HIDDEN}"):
        lens(torch.randn(2, 16), 0)
    with pytest.raises(ShapeError, match="expected hidden states"):
        lens.transform_all(torch.randn(N_LAYERS, 4, 16))
    with pytest.raises(ShapeError, match="expected hidden states"):
        lens.transform_all(torch.randn(N_LAYERS + 1, 4, HIDDEN))
    with pytest.raises(ShapeError, match="out of range"):
        lens.transform_hidden(torch.randn(2, HIDDEN), N_LAYERS)


def test_bound_lens_does_not_own_the_unembedding(adapter: ModelAdapter) -> None:
    lens = TunedLens.from_model(adapter)
    assert set(lens.state_dict()) == {"weight", "bias"}
    assert lens.num_parameters() == N_LAYERS * (HIDDEN * HIDDEN + HIDDEN)
    assert all(p is not adapter.unembed.weight for p in lens.parameters())
    assert LogitLens.from_model(adapter).num_parameters() == 0
    assert set(LowRankLens.from_model(adapter, rank=2).state_dict()) == {"up", "down", "bias"}


def test_unbound_lens_raises_config_error() -> None:
    lens = TunedLens(LensConfig(lens_type="tuned", n_layers=2, hidden_size=8))
    with pytest.raises(ConfigError, match="bind"):
        lens(torch.randn(8), 0)


# --------------------------------------------------------------- save / load
def _assert_same_lens(a: Lens, b: Lens) -> None:
    assert type(a) is type(b)
    assert a.config.to_dict() == b.config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kind", ["tuned", "lowrank", "lowrank_rank5", "logit", "tuned_nobias"])
def test_save_load_round_trip(
    adapter: ModelAdapter, hidden: Tensor, tmp_path: Path, kind: str
) -> None:
    if kind == "tuned":
        lens = randomize(TunedLens.from_model(adapter))
    elif kind == "lowrank":
        lens = randomize(LowRankLens.from_model(adapter, k=8))
    elif kind == "lowrank_rank5":
        lens = randomize(LowRankLens.from_model(adapter, rank=5))
    elif kind == "logit":
        lens = LogitLens.from_model(adapter)
    else:
        config = LensConfig(
            lens_type="tuned",
            n_layers=N_LAYERS,
            hidden_size=HIDDEN,
            bias=False,
            unembed_hash=adapter.unembedding_hash(),
        )
        lens = randomize(TunedLens(config)).bind(adapter)
    folder = save_lens(lens, tmp_path / "lens")
    assert (folder / "config.json").exists() and (folder / "lens.safetensors").exists()
    loaded = load_lens(folder, adapter)
    _assert_same_lens(lens, loaded)
    if kind == "lowrank_rank5":
        assert loaded.rank == 5 and loaded.config.rank == 5
    torch.testing.assert_close(
        all_layer_logits(loaded, hidden), all_layer_logits(lens, hidden), rtol=0, atol=0
    )
    # Without an adapter the lens loads unbound.
    with pytest.raises(ConfigError):
        load_lens(folder)(hidden[0], 0)


def test_saved_config_records_model_identity(adapter: ModelAdapter, tmp_path: Path) -> None:
    folder = save_lens(LowRankLens.from_model(adapter, rank=2), tmp_path / "lens")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["lens_type"] == "lowrank" and cfg["rank"] == 2
    assert cfg["unembed_hash"] == adapter.unembedding_hash()
    assert (cfg["n_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (N_LAYERS, HIDDEN, VOCAB)
    assert cfg["model_id"] == adapter.model_id


def test_save_overwrites_existing_folder(adapter: ModelAdapter, tmp_path: Path) -> None:
    first = randomize(TunedLens.from_model(adapter), seed=1)
    second = randomize(TunedLens.from_model(adapter), seed=2)
    save_lens(first, tmp_path / "lens")
    save_lens(second, tmp_path / "lens")
    _assert_same_lens(second, load_lens(tmp_path / "lens", adapter))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]  # no temp or trash left


def test_failure_inside_atomic_dir_keeps_old_folder(adapter: ModelAdapter, tmp_path: Path) -> None:
    lens = randomize(TunedLens.from_model(adapter))
    folder = save_lens(lens, tmp_path / "lens")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(folder) as tmp:
            (tmp / "config.json").write_text("{half written")
            raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]
    _assert_same_lens(lens, load_lens(folder, adapter))


def test_failed_save_lens_keeps_old_folder(
    adapter: ModelAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = randomize(TunedLens.from_model(adapter), seed=1)
    folder = save_lens(old, tmp_path / "lens")

    def broken_save_file(*args: object, **kwargs: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(lens_io, "save_file", broken_save_file)
    with pytest.raises(OSError, match="no space"):
        save_lens(randomize(TunedLens.from_model(adapter), seed=2), folder)
    _assert_same_lens(old, load_lens(folder, adapter))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]


# ------------------------------------------------------------------ mismatch
def test_lens_for_other_unembedding_is_refused(tiny_adapter, tmp_path: Path) -> None:
    own = tiny_adapter("llama", seed=0)
    other = tiny_adapter("llama", seed=1)  # same shapes, different W_U
    assert own.unembedding_hash() != other.unembedding_hash()
    lens = randomize(TunedLens.from_model(own))
    folder = save_lens(lens, tmp_path / "lens")
    with pytest.raises(LensMismatchError, match="allow-mismatch"):
        load_lens(folder, other)
    with pytest.raises(LensMismatchError):
        lens.bind(other)
    loaded = load_lens(folder, other, allow_mismatch=True)
    _assert_same_lens(lens, loaded)
    assert loaded.unembed is other.unembed


def test_unembedding_hash_is_stable_and_dtype_independent(tiny_adapter) -> None:
    a, b = tiny_adapter("gemma2"), tiny_adapter("gemma2")
    assert a.unembedding_hash() == b.unembedding_hash()
    b.model.to(torch.bfloat16)
    assert ModelAdapter(b.model).unembedding_hash() == a.unembedding_hash()


def test_lens_with_other_shape_is_refused_even_with_allow_mismatch(
    adapter: ModelAdapter, tmp_path: Path
) -> None:
    lens = TunedLens(LensConfig(lens_type="tuned", n_layers=N_LAYERS, hidden_size=HIDDEN + 16))
    folder = save_lens(lens, tmp_path / "lens")
    for allow in (False, True):
        with pytest.raises(LensMismatchError, match=f"H={HIDDEN + 16}"):
            load_lens(folder, adapter, allow_mismatch=allow)


# ---------------------------------------------------------------- tuned-lens
def test_export_writes_tuned_lens_format(
    adapter: ModelAdapter, hidden: Tensor, tmp_path: Path
) -> None:
    lens = randomize(TunedLens.from_model(adapter))
    folder = export_tuned_lens(lens, tmp_path / "tl")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.pt"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["d_model"] == HIDDEN and cfg["num_hidden_layers"] == N_LAYERS
    assert cfg["bias"] is True and cfg["base_model_name_or_path"] == adapter.model_id
    assert {"base_model_revision", "unembed_hash", "lens_type"} <= cfg.keys()
    state = torch.load(folder / "params.pt", weights_only=True)
    assert set(state) == {f"{i}.{p}" for i in range(N_LAYERS) for p in ("weight", "bias")}
    # tuned-lens stores its translators as the state of an nn.ModuleList of nn.Linear.
    translators = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(N_LAYERS))
    translators.load_state_dict(state, strict=True)
    with torch.no_grad():
        for i in range(N_LAYERS):
            h = hidden[i]
            torch.testing.assert_close(h + translators[i](h), lens.transform_hidden(h, i))


def test_tuned_lens_round_trip(adapter: ModelAdapter, hidden: Tensor, tmp_path: Path) -> None:
    lens = randomize(TunedLens.from_model(adapter))
    folder = export_tuned_lens(lens, tmp_path / "tl")
    imported = import_tuned_lens(folder)
    assert isinstance(imported, TunedLens)
    assert torch.equal(imported.weight, lens.weight) and torch.equal(imported.bias, lens.bias)
    assert imported.config.extra["imported_from"] == "tuned-lens"
    loaded = load_lens(folder, adapter)  # load_lens recognises the tuned-lens layout
    torch.testing.assert_close(
        all_layer_logits(loaded, hidden), all_layer_logits(lens, hidden), rtol=0, atol=0
    )


def test_lowrank_exports_as_product(adapter: ModelAdapter, hidden: Tensor, tmp_path: Path) -> None:
    lens = randomize(LowRankLens.from_model(adapter, rank=3))
    folder = export_tuned_lens(lens, tmp_path / "tl")
    imported = load_lens(folder, adapter)
    assert isinstance(imported, TunedLens)
    for i in range(N_LAYERS):
        torch.testing.assert_close(imported.weight[i], lens.up[i] @ lens.down[i])
        assert int(torch.linalg.matrix_rank(imported.weight[i])) == 3
    torch.testing.assert_close(
        all_layer_logits(imported, hidden), all_layer_logits(lens, hidden), rtol=1e-5, atol=1e-5
    )


def test_tuned_lens_without_bias_exports_zero_bias(adapter: ModelAdapter, tmp_path: Path) -> None:
    config = LensConfig(lens_type="tuned", n_layers=N_LAYERS, hidden_size=HIDDEN, bias=False)
    lens = randomize(TunedLens(config))
    state = torch.load(export_tuned_lens(lens, tmp_path / "tl") / "params.pt", weights_only=True)
    assert all(torch.count_nonzero(state[f"{i}.bias"]) == 0 for i in range(N_LAYERS))


def test_logit_lens_cannot_be_exported(adapter: ModelAdapter, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        export_tuned_lens(LogitLens.from_model(adapter), tmp_path / "tl")


# ------------------------------------------------------------- corrupt folders
def _saved(adapter: ModelAdapter, tmp_path: Path, kind: str = "tuned") -> Path:
    lens = (
        TunedLens.from_model(adapter) if kind == "tuned" else LowRankLens.from_model(adapter, k=4)
    )
    return save_lens(randomize(lens), tmp_path / "lens")


def test_missing_folder_raises(adapter: ModelAdapter, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no lens found"):
        load_lens(tmp_path / "nothing_here", adapter)


@pytest.mark.parametrize("kind", ["tuned", "lowrank"])
@pytest.mark.parametrize(
    "damage",
    [
        "config_garbage",
        "config_unknown_type",
        "weights_missing",
        "weights_garbage",
        "weights_truncated",
        "weights_wrong_keys",
    ],
)
def test_corrupt_lens_folder_raises(
    adapter: ModelAdapter, tmp_path: Path, kind: str, damage: str
) -> None:
    folder = _saved(adapter, tmp_path, kind)
    weights = folder / "lens.safetensors"
    if damage == "config_garbage":
        (folder / "config.json").write_text("{not json")
    elif damage == "config_unknown_type":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(cfg, lens_type="mystery")))
    elif damage == "weights_missing":
        weights.unlink()
    elif damage == "weights_garbage":
        weights.write_bytes(b"\x00\x01garbage" * 10)
    elif damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        from safetensors.torch import save_file

        save_file({"unexpected": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError):
        load_lens(folder, adapter)


def test_nonfinite_weights_raise(adapter: ModelAdapter, tmp_path: Path) -> None:
    lens = randomize(TunedLens.from_model(adapter))
    with torch.no_grad():
        lens.weight[0, 0, 0] = float("nan")
    folder = save_lens(lens, tmp_path / "lens")
    with pytest.raises(CheckpointError, match="NaN"):
        load_lens(folder, adapter)


@pytest.mark.parametrize(
    "damage", ["params_garbage", "params_missing_layer", "config_no_dmodel", "params_wrong_shape"]
)
def test_corrupt_tuned_lens_folder_raises(
    adapter: ModelAdapter, tmp_path: Path, damage: str
) -> None:
    folder = export_tuned_lens(randomize(TunedLens.from_model(adapter)), tmp_path / "tl")
    params = folder / "params.pt"
    if damage == "params_garbage":
        params.write_bytes(b"definitely not a torch file")
    elif damage == "params_missing_layer":
        state = torch.load(params, weights_only=True)
        del state[f"{N_LAYERS - 1}.weight"]
        torch.save(state, params)
    elif damage == "params_wrong_shape":
        state = torch.load(params, weights_only=True)
        state["0.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
        torch.save(state, params)
    else:
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["d_model"]
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_lens(folder, adapter)
