"""TrainConfig: every training option, one field each, mapping one-to-one onto the CLI.

The field docs (`metadata["help"]`) are the single source of `lensforge train --help`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lensforge.errors import ConfigError

# Documented defaults. AdamW as in LoRA-Lens; SGD with Nesterov momentum as in
# tuned-lens (lr 1.0 x (1 - momentum), weight decay 1e-3 toward the identity).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999)},
    "sgd": {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.9},
}


def _opt(default: object = None, *, help: str,  # noqa: A002 — argparse's name for it
         factory: Callable[[], object] | None = None) -> Any:
    """A TrainConfig field and its documentation: `help` is the `lensforge train` help text
    of the option (cmd_train reads it from here, so the two cannot drift apart)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training option, one field each, mapping one-to-one onto `lensforge train`.

    Each field's `metadata["help"]` documents it and is the option's --help text (see
    `field_help`); the field list with those texts is appended to this docstring below.
    """

    model: str = _opt("smollm2", help="built-in name (smollm2, gemma3-270m), folder, .gguf "
                                      "file or hub id")
    data: str = _opt("stdlib", help="text: .txt/.jsonl/.parquet file or folder (.gz ok), a "
                                    "Hugging Face dataset name, or 'stdlib' (built-in corpus)")
    text_field: str = _opt("text", help="jsonl/parquet field")
    lens_types: list[str] = _opt(factory=lambda: ["lowrank"],
                                 help="lens types to train (one forward pass)")
    rank: int | None = _opt(None, help="LoRA rank r (overrides -k)")
    k: int = _opt(32, help="LoRA rank divisor: r = floor(H/k)")
    ranks_k: list[int] = _opt(factory=list,
                              help="also train LoRA lenses with these divisors k")
    init: str = _opt("closed-form", help="starting point: the closed-form least-squares fit, "
                                         "or zero (the logit lens)")
    init_tokens: int = _opt(32_768, help="tokens of statistics for the closed-form init")
    ridge: float = _opt(1e-3, help="relative ridge penalty")
    optimizer: str = _opt("adamw", help=f"defaults: {OPTIMIZER_DEFAULTS}")
    # The unset default is the optimizer's (OPTIMIZER_DEFAULTS); the help says so.
    lr: float | None = _opt(None, help="learning rate (unset: the optimizer's, adamw 1e-3, "
                                       "sgd 0.1)")
    weight_decay: float | None = _opt(None, help="weight decay (unset: the optimizer's, adamw "
                                                 "0, sgd 1e-3)")
    momentum: float = _opt(0.9, help="SGD Nesterov momentum")
    warmup_steps: int = _opt(0, help="optimizer steps of linear learning-rate warm-up (then linear "
                                        "decay to zero)")
    tokens: int = _opt(65_536, help="KL fine-tuning token budget (0: closed form only)")
    tokens_per_step: int = _opt(8_192, help="tokens per optimizer step (gradient accumulation)")
    batch_size: int = _opt(4, help="sequences per batch")
    seq_len: int = _opt(512, help="tokens per sequence")
    clip: float = _opt(1.0, help="gradient-norm clip (0: off)")
    seed: int = _opt(0, help="random seed (lens init, subset-loss tail samples)")
    dtype: str = _opt("auto", help="model dtype: auto (bf16 on GPU or a CPU with bf16 "
                                   "hardware, else float32), float32 or bfloat16")
    device: str = _opt("cpu", help="torch device")
    checkpoint_every: int = _opt(10, help="steps between atomic checkpoints")
    token_chunk: int = _opt(2048, help="tokens per logits block (memory bound)")
    # "fused": exact KL (fast_loss.py); "subset": top-k + sampled-tail estimate
    # (subset_loss.py); "reference": loss.py, the slow oracle.
    loss: str = _opt("fused", help="KL implementation: fused (exact, batched layers), subset "
                                   "(target top-k + sampled tail, an estimate; see "
                                   "docs/subset_kl.md) or reference (the slow oracle)")
    subset_k: int = _opt(128, help="subset loss: target top-k tokens per token")
    subset_tail: int = _opt(256, help="subset loss: sampled tail ids per token chunk")
    out: str = _opt("runs/train", help="output folder")

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


def field_help(name: str) -> str:
    """The documentation of TrainConfig field `name` (its `lensforge train` help text)."""
    return TrainConfig.__dataclass_fields__[name].metadata["help"]


# help(TrainConfig) lists the fields with their docs (generated, so it cannot go stale).
TrainConfig.__doc__ = (TrainConfig.__doc__ or "") + "\n    Fields:\n" + "".join(
    f"      {f.name}: {f.metadata['help']}\n" for f in fields(TrainConfig))
