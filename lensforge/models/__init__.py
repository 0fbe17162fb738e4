"""Model loading and the adapter that gives every causal LM the same parts."""

from lensforge.models.adapter import ModelAdapter, Unembed
from lensforge.models.loading import DEFAULT_MODEL, load_model, parse_dtype

__all__ = ["DEFAULT_MODEL", "ModelAdapter", "Unembed", "load_model", "parse_dtype"]
