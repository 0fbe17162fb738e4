"""Pure per-token lens metrics (nats), a streaming per-layer accumulator, and report I/O."""

from lensforge.metrics.accumulator import (
    PER_LAYER_METRICS,
    LayerMetricAccumulator,
    LayerMetrics,
    MeanMetrics,
)
from lensforge.metrics.agreement import precision_at_k, surprisal, target_rank, top2_gap
from lensforge.metrics.divergence import (
    cross_entropy,
    entropy,
    entropy_from_logprobs,
    kl_divergence,
    kl_from_logprobs,
)
from lensforge.metrics.fidelity import relative_alignment_fidelity
from lensforge.metrics.report_io import (
    read_layer_metrics,
    read_layer_metrics_csv,
    write_layer_metrics,
)

__all__ = [
    "PER_LAYER_METRICS",
    "LayerMetricAccumulator",
    "LayerMetrics",
    "MeanMetrics",
    "cross_entropy",
    "entropy",
    "entropy_from_logprobs",
    "kl_divergence",
    "kl_from_logprobs",
    "precision_at_k",
    "read_layer_metrics",
    "read_layer_metrics_csv",
    "relative_alignment_fidelity",
    "surprisal",
    "target_rank",
    "top2_gap",
    "write_layer_metrics",
]
