"""Early-exit decoding that really skips blocks (CALM with state propagation).

The decode loop drives the model's own modules (which ones, per family: families.py):
embedding, rotary embedding, each decoder layer, final norm and unembedding, with a
transformers `DynamicCache`. `EarlyExitDecoder` holds one sequence's state; `prefill`
runs the full model over the prompt, then each `step()` emits one token:

1. run blocks 0, 1, ... in order; after block j-1, at the exit layers only, apply
   the lens to the residual h_j and compute its confidence Δ (see `confidence.py`);
2. if Δ passes the exit policy (`policy.py`; by default the CALM rule, `rule.py`), emit
   the lens's token and stop: blocks j..L-1 are *not* run for this token;
3. for each skipped block s, append a K/V entry for this position computed from the
   exit state h_j (CALM's state propagation, `kv.py`).

Batch size 1 (exit decisions are per token). Supported families: see SUPPORTED_FAMILIES.
`generate` is the one-call API over it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from lensforge.early_exit.confidence import CheckResult, make_check
from lensforge.early_exit.families import SUPPORTED_FAMILIES, ModelParts, resolve
from lensforge.early_exit.kv import KVPropagator, propagated_kv
from lensforge.early_exit.policy import CalmPolicy, ExitPolicy
from lensforge.early_exit.rule import check_lambda
from lensforge.errors import ConfigError, ShapeError
from lensforge.lenses import Lens, check_compatible

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig

    from lensforge.models.adapter import ModelAdapter

__all__ = ["SUPPORTED_FAMILIES", "EarlyExitDecoder", "GenerationResult", "KVPropagator",
           "Sampler", "generate", "propagated_kv"]


@dataclass
class GenerationResult:
    """Generated tokens and where each one left the model.

    `exit_layers[i]` is the residual index the i-th new token was emitted from: j < L
    means blocks j..L-1 were skipped; L (= `n_layers`) means the full model ran.
    """

    prompt_ids: list[int]
    tokens: list[int]
    exit_layers: list[int]
    n_layers: int
    n_checks: int = 0
    n_full_checks: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    text: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def exit_rate(self) -> float:
        """Share of new tokens emitted before the last block (the prefill token counts)."""
        if not self.tokens:
            return 0.0
        return sum(j < self.n_layers for j in self.exit_layers) / len(self.tokens)

    @property
    def mean_exit_layer(self) -> float:
        """Mean residual index tokens were emitted from (L for full-model tokens)."""
        return sum(self.exit_layers) / max(len(self.exit_layers), 1)

    @property
    def tokens_per_second(self) -> float:
        """New tokens over prefill + decode wall time."""
        total = self.prefill_seconds + self.decode_seconds
        return len(self.tokens) / total if total > 0 else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {
            "new_tokens": len(self.tokens),
            "exit_rate": self.exit_rate,
            "mean_exit_layer": self.mean_exit_layer,
            "n_layers": self.n_layers,
            "lens_checks": self.n_checks,
            "full_lens_checks": self.n_full_checks,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
        }

@dataclass
class Sampler:
    """Greedy (do_sample=False) or seeded temperature / top-k sampling of a token id."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed) if self.do_sample \
            else None

    def __call__(self, logits: Tensor) -> int:
        """A token id from logits [V]."""
        logits = logits.reshape(-1).float()
        if not self.do_sample:
            return int(torch.argmax(logits))
        scaled = logits / self.temperature
        if self.top_k is not None and self.top_k < scaled.shape[0]:
            kth = torch.topk(scaled, self.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=self._gen))


class EarlyExitDecoder:
    """One sequence's early-exit decode state: the KV cache, the position, the last token,
    the tokens and exit layers so far, and the check counters.

    `checks`: residual indices j (1..L-1) where the lens is checked; empty (or no policy)
    switches exits off, and the decoder is then the model's own decoding. Inputs are
    expected valid (`generate` checks them); `parts` is `families.resolve(adapter)`.
    """

    def __init__(self, adapter: ModelAdapter, parts: ModelParts, *, lens: Lens | None = None,
                 checks: Iterable[int] = (), policy: ExitPolicy | None = None,
                 check: str = "full", screen_static: int = 1024,
                 sampler: Sampler | None = None) -> None:
        self.adapter, self.parts = adapter, parts
        self.n_layers = len(parts.layers)
        self.checks = frozenset(checks) if policy is not None else frozenset()
        self.policy = policy
        self.sample = sampler or Sampler()
        self.checker = None
        self.propagate = None
        if self.checks:
            if lens is None:
                raise ConfigError("early exit needs a lens (or no checks to switch exits off)")
            options = {"static": screen_static} if check in ("screened", "shortlist") else {}
            self.checker = make_check(lens, check, **options)
            # Fused K/V propagation for the blocks after the first exit layer (a few MB of
            # weights copied once, before the clock starts).
            self.propagate = KVPropagator(parts.layers, min(self.checks))
        self.cache: DynamicCache | None = None
        self.pos = 0
        self.tokens: list[int] = []
        self.exit_layers: list[int] = []
        self.n_checks = self.n_full_checks = 0

    @property
    def token(self) -> int:
        """The last emitted token (the next step's input)."""
        return self.tokens[-1]

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> int:
        """Run the full model over the prompt ids [1, T], filling every layer's cache; emit
        and return the first new token."""
        from transformers import DynamicCache

        model = self.adapter.model
        self.cache = DynamicCache(config=cast("PretrainedConfig", model.config))
        out = model(input_ids=ids, use_cache=True, **{self.parts.model_cache_kw: self.cache})
        logits = out.logits[0, -1]
        token = self.sample(logits)
        if self.checker is not None:
            self.checker.reset(ids[0].tolist())
            self.checker.observe(token, logits)
        self.pos = ids.shape[1]
        self._emit(token, self.n_layers)
        return token

    @torch.no_grad()
    def step(self) -> int:
        """Decode one token: run blocks until the policy accepts a lens check (then fill the
        skipped blocks' cache from the exit state) or the last block; return the token."""
        if self.cache is None:
            raise RuntimeError("EarlyExitDecoder.step() before prefill()")
        parts, device = self.parts, self.adapter.device
        h = parts.embed(torch.tensor([[self.token]], device=device))
        position_ids = torch.tensor([[self.pos]], device=device)
        cos, sin = parts.rotary(h, position_ids)
        kwargs = {"attention_mask": None, "position_ids": position_ids, "use_cache": True,
                  "position_embeddings": (cos, sin), parts.layer_cache_kw: self.cache}
        step = len(self.tokens)
        result: CheckResult | None = None
        exit_at, prev_top, streak = self.n_layers, -1, 0
        for j, layer in enumerate(parts.layers):
            h = layer(h, **kwargs)
            if j + 1 not in self.checks:
                continue
            assert self.checker is not None and self.policy is not None  # set with checks
            result = self.checker(h[0, 0], j + 1, self.policy.threshold(step, j + 1))
            self.n_checks += 1
            self.n_full_checks += result.full
            streak = streak + 1 if result.top1 == prev_top else 0
            prev_top = result.top1
            if result.exit and streak >= self.policy.patience:
                exit_at = j + 1
                break
        if exit_at < self.n_layers:
            # an exit was checked, and an exiting check carries its logits
            assert self.propagate is not None and result is not None and result.logits is not None
            self.propagate(self.cache, h, exit_at, cos, sin)
            logits = result.logits
        else:
            logits = self.adapter.final_logits(h[0, 0])
        token = self.sample(logits)
        if self.checker is not None:
            self.checker.observe(token, logits)
        self.pos += 1
        self._emit(token, exit_at)
        return token

    def _emit(self, token: int, exit_at: int) -> None:
        self.tokens.append(token)
        self.exit_layers.append(exit_at)


def _exit_layer_set(n_layers: int, exit_layers: Sequence[int] | None, exit_every: int | None,
                    min_layer: int) -> list[int]:
    if exit_every is not None and exit_layers is not None:
        raise ConfigError("give exit_layers or exit_every, not both")
    if exit_every is not None:
        if exit_every < 1:
            raise ConfigError(f"exit_every must be >= 1, got {exit_every}")
        exit_layers = range(exit_every, n_layers, exit_every)
    if exit_layers is None:
        exit_layers = range(1, n_layers)
    layers = sorted(set(int(j) for j in exit_layers))
    bad = [j for j in layers if not 1 <= j < n_layers]
    if bad:
        raise ConfigError(
            f"exit layers must be residual indices in 1..{n_layers - 1} (exit after block j-1), "
            f"got {bad}"
        )
    return [j for j in layers if j >= min_layer]


def _checked_prompt(prompt_ids: Tensor | Sequence[int], parts: ModelParts) -> Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ShapeError("the prompt is empty")
    if int(ids.max()) >= parts.embed.num_embeddings or int(ids.min()) < 0:
        raise ShapeError("prompt token id out of the model's vocabulary: tokenizer/model mismatch?")
    return ids


@torch.no_grad()
def generate(
    adapter: ModelAdapter,
    lens: Lens | None,
    prompt_ids: Tensor | Sequence[int],
    max_new_tokens: int = 64,
    lam: float | None = 0.9,
    *,
    exit_layers: Sequence[int] | None = None,
    exit_every: int | None = None,
    min_layer: int = 1,
    check: str = "full",
    screen_static: int = 1024,
    patience: int = 0,
    layer_thresholds: Mapping[int, float] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    avg_input_len: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    policy: ExitPolicy | None = None,
    return_cache: bool = False,
) -> GenerationResult | tuple[GenerationResult, object]:
    """Decode with CALM early exit from `lens`.

    prompt_ids: [T] or [1, T] token ids. lam: λ in [0, 1], or None to switch exits off
    (then the output equals the model's own greedy/sampled decoding). exit_layers:
    residual indices j in 1..L-1 to check (default all); exit_every=m checks j = m, 2m, ...;
    min_layer drops earlier ones. check="screened" screens each check over a shortlist
    (`screen_static` most frequent ids + prompt + history) and runs the full [1 × V]
    check only when the screen says exit; check="shortlist" lets the shortlist alone
    decide and pick the exit token (no [1 × V] unembedding on exit; see confidence.py).
    patience=p additionally requires the lens's top-1 to be the same at this check and
    the p checks before it (of the same token) before exiting: a stability condition on
    top of the CALM rule that trades exits for exit precision (0: the plain CALM rule).
    layer_thresholds: calibrated per-layer thresholds t_j; only those layers are checked.
    avg_input_len: the rule's N (default: this prompt's length).
    stop_tokens: default the model's EOS ids; () never stops early.
    policy: an `ExitPolicy` used instead of the CALM rule built from lam, layer_thresholds
    and patience (lam is then ignored); e.g. one that always exits at a fixed layer.
    Returns a GenerationResult (and the DynamicCache when return_cache=True).
    """
    lam = check_lambda(lam)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampler = Sampler(do_sample, temperature, top_k, seed)
    if patience < 0:
        raise ConfigError(f"patience must be >= 0, got {patience}")
    parts = resolve(adapter)
    L = len(parts.layers)
    uses_lens = lam is not None or policy is not None
    if uses_lens:
        if lens is None:
            raise ConfigError("early exit needs a lens (or lam=None to switch exits off)")
        # Shapes must match; the unembedding hash was checked by load_lens / bind.
        check_compatible(lens.config, adapter, allow_mismatch=True)
    checks = set(_exit_layer_set(L, exit_layers, exit_every, min_layer))
    per_layer: dict[int, float] = {}
    if layer_thresholds is not None:
        per_layer = {int(j): float(t) for j, t in layer_thresholds.items()}
        bad = [j for j in per_layer if not 1 <= j < L]
        if bad:
            raise ConfigError(f"layer_thresholds names layers outside 1..{L - 1}: {bad}")
        checks &= set(per_layer)
    ids = _checked_prompt(prompt_ids, parts).to(adapter.device)
    if stop_tokens is None:
        eos = getattr(getattr(adapter.model, "generation_config", None), "eos_token_id", None)
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stop = set(int(t) for t in stop_tokens)
    N = float(avg_input_len) if avg_input_len is not None else float(ids.shape[1])
    if policy is None and lam is not None:
        policy = CalmPolicy(lam, N, per_layer, patience)
    decoder = EarlyExitDecoder(adapter, parts, lens=lens, checks=checks if uses_lens else (),
                               policy=policy, check=check, screen_static=screen_static,
                               sampler=sampler)

    t0 = time.perf_counter()
    token = decoder.prefill(ids)
    t1 = time.perf_counter()
    while len(decoder.tokens) < max_new_tokens and token not in stop:
        token = decoder.step()
    t2 = time.perf_counter()

    tok = getattr(adapter, "tokenizer", None)
    tokens = decoder.tokens
    settings = {"lambda": lam, "exit_layers": sorted(decoder.checks),
                "check": getattr(decoder.checker, "name", None),
                "screen_static": screen_static if check in ("screened", "shortlist") else None,
                "patience": patience,
                "layer_thresholds": per_layer or None,
                "do_sample": do_sample, "N": N}
    if policy is not None and not isinstance(policy, CalmPolicy):
        settings["policy"] = type(policy).__name__
    result = GenerationResult(
        prompt_ids=ids[0].tolist(), tokens=tokens, exit_layers=decoder.exit_layers, n_layers=L,
        n_checks=decoder.n_checks, n_full_checks=decoder.n_full_checks,
        prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
        text=tok.decode(tokens, skip_special_tokens=True) if tok is not None else None,
        settings=settings,
    )
    return (result, decoder.cache) if return_cache else result
