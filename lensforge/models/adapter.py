"""ModelAdapter: one set of names for every causal LM, and exact hidden-state capture.

`h_l` (l = 0..L-1) is the residual stream *entering* block l; `h_L` is the residual
stream entering the final norm. Both are captured with forward pre-hooks, so they are
right whatever the family does to `output_hidden_states` (HF's last entry is already
normed, which would make the logit lens normalize twice).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lensforge.errors import NonFiniteError, ShapeError, UnsupportedModelError
from lensforge.models.parts import PartPaths, find_parts


class _StopForward(Exception):
    """Raised from a hook to skip the rest of the forward pass once we have what we need."""


class Unembed(nn.Module):
    """Final norm, unembedding and family quirks: logits = cap(scale * W_U norm(h) + b)."""

    def __init__(
        self,
        norm: nn.Module,
        lm_head: nn.Module,
        *,
        softcap: float | None = None,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.softcap = softcap
        self.logit_scale = logit_scale

    @property
    def weight(self) -> Tensor:
        """W_U, shape [V, H]."""
        return cast(Tensor, self.lm_head.weight)  # ModelAdapter checked it is 2-D

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.lm_head, "bias", None)

    def logits_from_normed(self, x: Tensor) -> Tensor:
        """x: [..., H] already normed -> logits [..., V]."""
        logits = self.lm_head(x)
        return self.apply_quirks(logits)

    def apply_quirks(self, logits: Tensor) -> Tensor:
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            # Gemma 2 style soft-capping: cap * tanh(logits / cap).
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, h: Tensor) -> Tensor:
        """h: [..., H] residual stream -> logits [..., V]."""
        return self.logits_from_normed(self.norm(h))


class ModelAdapter:
    """Wraps a Hugging Face causal LM and exposes its standard parts.

    Attributes: `model`, `layers` (ModuleList of L blocks), `unembed` (Unembed),
    `n_layers` (L), `hidden_size` (H), `vocab_size` (V), `model_id`, `family`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_id: str = "unknown",
        tokenizer: object | None = None,
        parts: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.model_id = model_id
        self.tokenizer: Any = tokenizer  # a transformers tokenizer (or None)
        config: Any = getattr(model, "config", None)  # HF config: attributes vary by family
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.config: Any = text_config
        self.family: str = getattr(config, "model_type", type(model).__name__)
        n_cfg = _first_attr(text_config, ("num_hidden_layers", "n_layer", "num_layers"))
        self.paths: PartPaths = find_parts(model, n_cfg, **(parts or {}))
        # find_parts checked it is a ModuleList or Sequential: both index and len() alike
        self.layers = cast(nn.ModuleList, model.get_submodule(self.paths.layers))
        norm = model.get_submodule(self.paths.norm)
        head = model.get_submodule(self.paths.lm_head)
        if not hasattr(head, "weight") or cast(Tensor, head.weight).dim() != 2:
            raise UnsupportedModelError(
                f"unembedding '{self.paths.lm_head}' has no 2-D weight; pass --lm-head-path"
            )
        softcap = _first_attr(text_config, ("final_logit_softcapping",))
        scale = float(_first_attr(text_config, ("logit_scale",)) or 1.0)
        scaling = _first_attr(text_config, ("logits_scaling",))  # Granite divides
        if scaling:
            scale /= float(scaling)
        self.unembed = Unembed(norm, head, softcap=softcap or None, logit_scale=scale)
        self.n_layers = len(self.layers)
        self.vocab_size, self.hidden_size = self.unembed.weight.shape
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self._unembed_hash: str | None = None

    # ------------------------------------------------------------------ info
    @property
    def device(self) -> torch.device:
        return self.unembed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    @property
    def tied(self) -> bool:
        emb = self.input_embeddings()
        return emb is not None and emb.weight.data_ptr() == self.unembed.weight.data_ptr()

    def input_embeddings(self) -> nn.Embedding:
        """The model's input embedding (HF `get_input_embeddings()`)."""
        get = cast(Callable[[], nn.Embedding], self.model.get_input_embeddings)
        return get()

    def unembedding_hash(self) -> str:
        """Hash of W_U (and the final norm's weight) that ties a lens to this model.

        Computed on bf16-rounded values so fp32 and bf16 loads of one model agree.
        """
        if self._unembed_hash is None:
            h = hashlib.sha256()
            tensors = [self.unembed.weight] + [p for p in self.unembed.norm.parameters()]
            if self.unembed.bias is not None:
                tensors.append(self.unembed.bias)
            for t in tensors:
                t16 = t.detach().to("cpu", torch.bfloat16).contiguous()
                h.update(str(tuple(t16.shape)).encode())
                h.update(t16.view(torch.int16).numpy().tobytes())
            self._unembed_hash = h.hexdigest()[:16]
        return self._unembed_hash

    def describe(self) -> dict[str, object]:
        return {
            "model_id": self.model_id,
            "family": self.family,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied,
            "softcap": self.unembed.softcap,
            "parts": vars(self.paths),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ------------------------------------------------------------- capture
    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        layers: Sequence[int] | None = None,
        check_finite: bool = True,
    ) -> Tensor:
        """Residual streams [n, B, T, H] for `layers` (default 0..L, where index L is the
        pre-norm final residual). Runs the model only as far as needed."""
        wanted = list(range(self.n_layers + 1)) if layers is None else list(layers)
        if not wanted:
            raise ShapeError("no layers requested")
        for idx in wanted:
            if not 0 <= idx <= self.n_layers:
                raise ShapeError(f"layer {idx} out of range 0..{self.n_layers}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ShapeError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
        if int(input_ids.max()) >= self.input_embeddings().num_embeddings:
            raise ShapeError("token id out of the model's vocabulary: tokenizer/model mismatch?")
        captured: dict[int, Tensor] = {}
        last = max(wanted)

        def grab(idx: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                if idx in wanted:
                    captured[idx] = h.detach()
                if idx == last:
                    raise _StopForward

            return hook

        handles = [
            self.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True)
            for i in range(min(last + 1, self.n_layers))
        ]
        if last == self.n_layers:
            handles.append(
                self.unembed.norm.register_forward_pre_hook(grab(self.n_layers), with_kwargs=True)
            )
        try:
            with torch.no_grad():
                self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                    use_cache=False,
                )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in wanted if i not in captured]
        if missing:
            raise UnsupportedModelError(
                f"layers {missing} were never reached in the forward pass; check --layers-path/--norm-path"
            )
        out = torch.stack([captured[i] for i in wanted])
        if check_finite and not torch.isfinite(out).all():
            raise NonFiniteError("NaN/Inf in the model's hidden states (try --dtype float32)")
        return out

    def final_logits(self, h_final: Tensor) -> Tensor:
        """Model logits from the pre-norm final residual h_L: [..., H] -> [..., V]."""
        return self.unembed(h_final)

    @torch.no_grad()
    def model_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The model's own logits, straight from its forward pass (used for self-checks)."""
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            use_cache=False,
        )
        return out.logits

    def check_exactness(self, input_ids: Tensor | None = None, atol: float | None = None) -> float:
        """Identity lens on the last block's output must reproduce the model's logits.

        Returns the max abs difference; raises UnsupportedModelError past `atol`."""
        if input_ids is None:
            g = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, self.vocab_size, (1, 8), generator=g)
        h = self.hidden_states(input_ids, layers=[self.n_layers])[0]
        with torch.no_grad():
            ours = self.final_logits(h).float()
        theirs = self.model_logits(input_ids).float()
        diff = float((ours - theirs).abs().max())
        if atol is None:
            atol = 1e-4 if self.dtype == torch.float32 else 5e-2 * float(theirs.abs().max())
        if not diff <= atol:
            raise UnsupportedModelError(
                f"self-check failed for {self.family}: identity lens differs from the model's "
                f"logits by {diff:.3g} (> {atol:.3g}); the detected norm/unembedding "
                f"({self.paths.norm}, {self.paths.lm_head}) may be wrong — name them by hand"
            )
        return diff

    # --------------------------------------------------------- interventions
    @contextlib.contextmanager
    def edit_residual(self, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Replace h_layer by fn(h_layer) in the model's own forward pass (l = L edits the
        input of the final norm)."""
        if not 0 <= layer <= self.n_layers:
            raise ShapeError(f"layer {layer} out of range 0..{self.n_layers}")
        target = self.layers[layer] if layer < self.n_layers else self.unembed.norm

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _first_attr(obj: object, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None
