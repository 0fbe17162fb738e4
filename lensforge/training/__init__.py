"""Lens training: closed-form initialization, then KL fine-tuning."""

from lensforge.training.config import OPTIMIZER_DEFAULTS, TrainConfig
from lensforge.training.loop import StepEvent, TrainResult, build_lenses, train

__all__ = ["OPTIMIZER_DEFAULTS", "StepEvent", "TrainConfig", "TrainResult", "build_lenses", "train"]
