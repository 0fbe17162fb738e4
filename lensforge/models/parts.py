"""Find the standard parts of a causal LM (blocks, final norm, unembedding) by attribute.

Detection is declarative: a list of dotted paths tried in order, plus a structural
fallback (the ModuleList whose length equals the layer count). No isinstance chain,
so a new family that follows any common layout works without code changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lensforge.errors import UnsupportedModelError

# Candidate dotted paths, most common first. Families covered:
# llama/mistral/qwen2/qwen3/gemma*/olmo2/phi3 -> model.layers / model.norm
# gpt2 -> transformer.h / transformer.ln_f; gpt-neox -> gpt_neox.layers / gpt_neox.final_layer_norm
# opt -> model.decoder.layers / model.decoder.final_layer_norm; phi(1/2) -> model.final_layernorm
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
    "layers",
)
NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "model.final_layernorm",
    "transformer.norm_f",
    "transformer.ln_f",
    "norm",
)


@dataclass(frozen=True)
class PartPaths:
    """Dotted paths of the parts, as found or as named by the user."""

    layers: str
    norm: str
    lm_head: str


def get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def find_parts(
    model: nn.Module,
    n_layers: int | None,
    *,
    layers: str | None = None,
    norm: str | None = None,
    lm_head: str | None = None,
) -> PartPaths:
    """Locate blocks, final norm and unembedding; explicit paths override detection."""
    layers_path = layers or _find_layers(model, n_layers)
    norm_path = norm or _find_norm(model)
    head_path = lm_head or _find_head(model)
    for what, path, flag in (
        ("layers", layers_path, "--layers-path"),
        ("final norm", norm_path, "--norm-path"),
        ("unembedding", head_path, "--lm-head-path"),
    ):
        if path is None or get_submodule(model, path) is None:
            raise UnsupportedModelError(
                f"could not find the {what} of {type(model).__name__}"
                + (f" at '{path}'" if path else "")
                + f"; name it by hand with {flag} (Python: load_model(..., parts=dict(...)))"
            )
    assert layers_path is not None and norm_path is not None and head_path is not None
    if not isinstance(model.get_submodule(layers_path), (nn.ModuleList, nn.Sequential)):
        raise UnsupportedModelError(f"'{layers_path}' is not a list of blocks; pass --layers-path")
    return PartPaths(layers=layers_path, norm=norm_path, lm_head=head_path)


def _find_layers(model: nn.Module, n_layers: int | None) -> str | None:
    for path in LAYER_PATHS:
        mod = get_submodule(model, path)
        if isinstance(mod, nn.ModuleList) and (n_layers is None or len(mod) == n_layers):
            return path
    # Structural fallback: the ModuleList whose length is the configured layer count.
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and n_layers is not None and len(mod) == n_layers:
            return name
    return None


def _find_norm(model: nn.Module) -> str | None:
    for path in NORM_PATHS:
        mod = get_submodule(model, path)
        if mod is not None and not isinstance(mod, nn.ModuleList):
            return path
    return None


def _find_head(model: nn.Module) -> str | None:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        return _module_path(model, head)
    return "lm_head" if get_submodule(model, "lm_head") is not None else None
