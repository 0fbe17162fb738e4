"""One exception type per user mistake. The CLI turns any of these into a one-line message."""

from __future__ import annotations


class LensforgeError(Exception):
    """Base class: a problem the user can fix. Message says what to do."""


class ModelLoadError(LensforgeError):
    """The model could not be found or loaded."""


class UnsupportedModelError(LensforgeError):
    """The adapter could not locate a required part (layers, norm, unembedding)."""


class LensMismatchError(LensforgeError):
    """A lens was built for another model (unembedding hash or shapes differ)."""


class ShapeError(LensforgeError):
    """A tensor has the wrong shape, e.g. a hidden state of the wrong width."""


class NonFiniteError(LensforgeError):
    """NaN or Inf found in hidden states, logits or the loss."""


class DataError(LensforgeError):
    """A data source is missing, unreadable or empty."""


class DataExhaustedError(DataError):
    """Training ran out of data before its token budget."""


class ConfigError(LensforgeError):
    """An option value is out of range or inconsistent (e.g. rank > hidden size)."""


class CheckpointError(LensforgeError):
    """A checkpoint or lens folder is missing, corrupt or incompatible."""
