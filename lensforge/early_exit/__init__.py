"""Early-exit generation from trained lenses (CALM rule, real block skipping)."""

from lensforge.early_exit.confidence import (
    CheckResult,
    FullVocabCheck,
    ScreenedCheck,
    ShortlistCheck,
    make_check,
)
from lensforge.early_exit.decoder import (
    SUPPORTED_FAMILIES,
    EarlyExitDecoder,
    GenerationResult,
    Sampler,
    generate,
)
from lensforge.early_exit.kv import KVPropagator, propagated_kv
from lensforge.early_exit.policy import CalmPolicy, ExitPolicy
from lensforge.early_exit.rule import calm_threshold, check_lambda, should_exit, top2_gap

__all__ = [
    "SUPPORTED_FAMILIES", "CalmPolicy", "CheckResult", "EarlyExitDecoder", "ExitPolicy",
    "FullVocabCheck", "GenerationResult", "KVPropagator", "Sampler",
    "ScreenedCheck", "ShortlistCheck",
    "calm_threshold", "check_lambda", "generate", "make_check", "propagated_kv", "should_exit",
    "top2_gap",
]
