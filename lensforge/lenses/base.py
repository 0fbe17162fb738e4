"""The Lens interface: transform a hidden state of layer l, then unembed.

Every lens is `z_l = unembed(h_l + delta_l(h_l))`; lens types differ only in delta.
Per-layer parameters are stacked into [L, ...] tensors so all layers can be applied
in one batched matmul during training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from lensforge import __version__
from lensforge.errors import ConfigError, LensMismatchError, ShapeError

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter, Unembed


@dataclass
class LensConfig:
    """Travels with every saved lens; ties it to its model via the unembedding hash."""

    lens_type: str
    n_layers: int
    hidden_size: int
    vocab_size: int | None = None
    rank: int | None = None
    bias: bool = True
    model_id: str = "unknown"
    family: str | None = None
    unembed_hash: str | None = None
    lensforge_version: str = __version__
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> LensConfig:
        """Build from a saved config; unknown keys are ignored (newer versions may add some).

        Every known field is type-checked, since the dict usually comes from a file on disk:
        a bad value is a ConfigError naming the field, never a TypeError later on.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a lens config must be a JSON object, got {type(data).__name__}")
        for key in ("lens_type", "n_layers", "hidden_size"):
            if key not in data:
                raise ConfigError(f"lens config lacks '{key}'")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key, value in known.items():
            ok, want = _FIELD_CHECKS[key]
            if not ok(value):
                raise ConfigError(f"lens config field '{key}' must be {want}, got {value!r:.60}")
        return cls(**known)


def _is_int(v: object, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _opt(check):  # noqa: ANN001, ANN202 — tiny local combinator
    return lambda v: v is None or check(v)


_FIELD_CHECKS = {
    "lens_type": (lambda v: isinstance(v, str), "a string"),
    "n_layers": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "hidden_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "vocab_size": (_opt(lambda v: _is_int(v, 1)), "an integer >= 1 or null"),
    "rank": (_opt(lambda v: _is_int(v, 1)), "an integer >= 1 or null"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "model_id": (lambda v: isinstance(v, str), "a string"),
    "family": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "unembed_hash": (_opt(lambda v: isinstance(v, str)), "a string or null"),
    "lensforge_version": (lambda v: isinstance(v, str), "a string"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
}


class Lens(nn.Module):
    """Base class. Subclasses implement `delta(h, idx)` and `delta_all(hs)`."""

    lens_type: ClassVar[str] = "base"

    def __init__(self, config: LensConfig) -> None:
        super().__init__()
        if config.n_layers < 1 or config.hidden_size < 1:
            raise ConfigError("a lens needs n_layers >= 1 and hidden_size >= 1")
        self.config = config
        # Not registered as a submodule: the unembedding belongs to the model and must
        # never be saved with (or trained as part of) the lens.
        self._unembed: Unembed | None = None

    # ------------------------------------------------------------ binding
    @classmethod
    def from_model(cls, adapter: ModelAdapter, **kwargs: object) -> Lens:
        """A fresh lens sized for `adapter` (a ModelAdapter) and bound to its unembedding."""
        config = LensConfig(
            lens_type=cls.lens_type,
            n_layers=adapter.n_layers,
            hidden_size=adapter.hidden_size,
            vocab_size=adapter.vocab_size,
            model_id=adapter.model_id,
            family=adapter.family,
            unembed_hash=adapter.unembedding_hash(),
        )
        lens = cls(config, **kwargs)
        lens.to(adapter.device)
        return lens.bind(adapter)

    def bind(self, adapter: ModelAdapter, *, allow_mismatch: bool = False) -> Lens:
        """Attach the model's unembedding; refuse a lens built for another model."""
        check_compatible(self.config, adapter, allow_mismatch=allow_mismatch)
        # object.__setattr__: nn.Module.__setattr__ would register the unembedding as a
        # submodule, putting the model's W_U into the lens's parameters and state_dict.
        object.__setattr__(self, "_unembed", adapter.unembed)
        return self

    @property
    def unembed(self) -> Unembed:
        if self._unembed is None:
            raise ConfigError("lens is not bound to a model: call lens.bind(adapter) first")
        return self._unembed

    # ------------------------------------------------------------- compute
    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def delta(self, h: Tensor, idx: int) -> Tensor:
        raise NotImplementedError

    def delta_all(self, hs: Tensor) -> Tensor:
        """hs: [L, N, H] (layer-major) -> the per-layer deltas, same shape."""
        return torch.stack([self.delta(hs[i], i) for i in range(hs.shape[0])])

    def transform_hidden(self, h: Tensor, idx: int) -> Tensor:
        """h: [..., H] residual stream entering block idx -> lens-aligned state [..., H]."""
        self._check(h, idx)
        return h + self.delta(h, idx)

    def transform_all(self, hs: Tensor) -> Tensor:
        """hs: [L, ..., H], layers 0..L-1 in order -> lens-aligned states, same shape."""
        if hs.dim() < 2 or hs.shape[0] != self.n_layers or hs.shape[-1] != self.config.hidden_size:
            raise ShapeError(
                f"expected hidden states [{self.n_layers}, ..., {self.config.hidden_size}], "
                f"got {tuple(hs.shape)}"
            )
        flat = hs.reshape(hs.shape[0], -1, hs.shape[-1])
        return (flat + self.delta_all(flat)).reshape(hs.shape)

    def forward(self, h: Tensor, idx: int) -> Tensor:
        """h: [..., H] -> logits [..., V] (transform, then unembed)."""
        return self.unembed(self.transform_hidden(h, idx))

    def _check(self, h: Tensor, idx: int) -> None:
        if h.shape[-1] != self.config.hidden_size:
            raise ShapeError(
                f"hidden state has width {h.shape[-1]} but this lens expects "
                f"{self.config.hidden_size} (lens for {self.config.model_id})"
            )
        if not 0 <= idx < self.n_layers:
            raise ShapeError(f"layer index {idx} out of range 0..{self.n_layers - 1}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_compatible(config: LensConfig, adapter: ModelAdapter, *, allow_mismatch: bool = False) -> None:
    """Raise LensMismatchError when a lens does not belong to this model."""
    if config.hidden_size != adapter.hidden_size or config.n_layers != adapter.n_layers:
        raise LensMismatchError(
            f"lens for {config.model_id} (L={config.n_layers}, H={config.hidden_size}) cannot be "
            f"used on {adapter.model_id} (L={adapter.n_layers}, H={adapter.hidden_size})"
        )
    if (
        not allow_mismatch
        and config.unembed_hash is not None
        and config.unembed_hash != adapter.unembedding_hash()
    ):
        raise LensMismatchError(
            f"lens was trained for {config.model_id} (unembedding {config.unembed_hash}) but "
            f"this model's unembedding is {adapter.unembedding_hash()}; pass "
            "--allow-mismatch (allow_mismatch=True) to use it anyway, e.g. for transfer"
        )
