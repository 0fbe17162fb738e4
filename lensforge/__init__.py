"""lensforge: logit, tuned and low-rank representation lenses for Hugging Face causal LMs."""

__version__ = "0.1.0"
