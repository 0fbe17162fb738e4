"""TrainConfig: every training option, one field each, mapping one-to-one onto the CLI."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lensforge.errors import ConfigError

# Documented defaults. AdamW as in LoRA-Lens; SGD with Nesterov momentum as in
# tuned-lens (lr 1.0 x (1 - momentum), weight decay 1e-3 toward the identity).
OPTIMIZER_DEFAULTS = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999)},
    "sgd": {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.9},
}


@dataclass
class TrainConfig:
    model: str = "smollm2"
    data: str = "stdlib"
    text_field: str = "text"
    lens_types: list[str] = field(default_factory=lambda: ["lowrank"])
    rank: int | None = None
    k: int = 32
    ranks_k: list[int] = field(default_factory=list)  # extra LoRA lenses by divisor k
    init: str = "closed-form"  # "closed-form" | "zero"
    init_tokens: int = 32_768
    ridge: float = 1e-3
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup_steps: int = 0
    tokens: int = 65_536  # KL fine-tuning token budget (0 = closed form only)
    tokens_per_step: int = 8_192
    batch_size: int = 4
    seq_len: int = 512
    clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    checkpoint_every: int = 10
    token_chunk: int = 2048
    # "fused": exact KL (fast_loss.py); "subset": top-k + sampled-tail estimate
    # (subset_loss.py); "reference": loss.py, the slow oracle.
    loss: str = "fused"
    subset_k: int = 128  # target top-k tokens per token of the subset loss
    subset_tail: int = 256  # sampled tail ids per token chunk of the subset loss
    out: str = "runs/train"

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise ConfigError(f"--optimizer must be one of {sorted(OPTIMIZER_DEFAULTS)}")
        if self.loss not in ("fused", "subset", "reference"):
            raise ConfigError("--loss must be 'fused', 'subset' or 'reference'")
        if self.subset_k < 1 or self.subset_tail < 1:
            raise ConfigError("--subset-k and --subset-tail must be >= 1")
        if self.init not in ("closed-form", "zero"):
            raise ConfigError("--init must be 'closed-form' or 'zero'")
        for t in self.lens_types:
            if t not in ("tuned", "lowrank"):
                raise ConfigError(f"cannot train lens type '{t}'; use tuned or lowrank")
        self._validate_numbers()
        for name, value in (("tokens", self.tokens), ("init_tokens", self.init_tokens),
                            ("warmup_steps", self.warmup_steps)):
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("batch_size", "seq_len", "tokens_per_step", "token_chunk", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.tokens_per_step < self.batch_size * self.seq_len:
            raise ConfigError("--tokens-per-step must be at least --batch-size x --seq-len")
        if self.tokens == 0 and self.init == "zero":
            raise ConfigError("nothing to do: --tokens 0 with --init zero")

    def _validate_numbers(self) -> None:
        """argparse's float() accepts nan and inf; none of them means anything here."""
        for name, value, low, high, low_open in (
            ("lr", self.lr, 0.0, math.inf, True),
            ("weight_decay", self.weight_decay, 0.0, math.inf, False),
            ("momentum", self.momentum, 0.0, 1.0, False),
            ("ridge", self.ridge, 0.0, math.inf, False),
            ("clip", self.clip, 0.0, math.inf, False),
        ):
            if value is None:
                continue
            bad_low = value <= low if low_open else value < low
            if not math.isfinite(value) or bad_low or value >= high:
                lower = f"> {low:g}" if low_open else f">= {low:g}"
                upper = "" if high == math.inf else f" and < {high:g}"
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number {lower}{upper}, "
                    f"got {value}"
                )

    @property
    def micro_tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def accumulation(self) -> int:
        return max(1, self.tokens_per_step // self.micro_tokens)

    @property
    def total_steps(self) -> int:
        return self.tokens // (self.accumulation * self.micro_tokens)

    def optimizer_settings(self) -> dict:
        settings = dict(OPTIMIZER_DEFAULTS[self.optimizer])
        if self.lr is not None:
            settings["lr"] = self.lr
        if self.weight_decay is not None:
            settings["weight_decay"] = self.weight_decay
        if self.optimizer == "sgd":
            settings["momentum"] = self.momentum
        return settings

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
