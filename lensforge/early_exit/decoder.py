"""Early-exit decoding that really skips blocks (CALM with state propagation).

The decode loop is written out over the model's own modules: embedding, rotary
embedding, each decoder layer, final norm and unembedding, with a transformers
`DynamicCache`. The prompt is prefilled by the full model. Then, per new token:

1. run blocks 0, 1, ... in order; after block j-1, at the exit layers only, apply
   the lens to the residual h_j and compute its confidence Δ (see `confidence.py`);
2. if Δ passes the CALM rule (`rule.py`), emit the lens's token and stop: blocks
   j..L-1 are *not* run for this token;
3. for each skipped block s, append a K/V entry for this position computed from the
   exit state h_j (CALM's state propagation): only block s's input norm, k/v
   projections (+ per-head k_norm where the family has one) and rotary on k. Later
   tokens then attend to every layer's cache as usual.

Batch size 1 (exit decisions are per token). Supported families: see SUPPORTED_FAMILIES.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lensforge.early_exit.confidence import CheckResult, make_check
from lensforge.early_exit.rule import calm_threshold, check_lambda
from lensforge.errors import ConfigError, ShapeError, UnsupportedModelError
from lensforge.lenses import Lens, check_compatible

# Pre-norm decoders with `input_layernorm`, `self_attn.{k,v}_proj`, rotary position
# embeddings at `model.model.rotary_emb` and full (non-sliding) attention.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


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


def _model_parts(adapter: object) -> tuple[nn.Module, nn.Module]:
    """(embedding, rotary embedding) of a supported model, else UnsupportedModelError."""
    family = str(adapter.family)
    supported = ", ".join(SUPPORTED_FAMILIES)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"early-exit generation does not support the '{family}' family yet "
            f"(supported: {supported}); it needs each block's K/V projections for CALM's "
            "state propagation"
        )
    config = adapter.config
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and (
        family == "mistral" or "sliding_attention" in layer_types
    ):
        raise UnsupportedModelError(
            f"early-exit generation needs full attention; this {family} model uses sliding-window "
            f"attention (supported: {supported} without sliding windows)"
        )
    inner = getattr(adapter.model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    layer0 = adapter.layers[0]
    attn = getattr(layer0, "self_attn", None)
    if rotary is None or attn is None or not all(
        hasattr(m, n) for m, n in ((layer0, "input_layernorm"), (attn, "k_proj"), (attn, "v_proj"))
    ):
        raise UnsupportedModelError(
            f"this {family} model lacks model.rotary_emb / input_layernorm / self_attn.k_proj, "
            f"v_proj (supported: {supported})"
        )
    return adapter.model.get_input_embeddings(), rotary


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def propagated_kv(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """K/V a skipped block caches for a token that exited with residual h.

    h: [1, 1, H]; cos/sin: [1, 1, head_dim] -> (k, v), each [1, n_kv_heads, 1, head_dim],
    rotary applied to k, exactly as the block's attention would store them had its input
    been h. (The decoder uses the fused `KVPropagator`; this is the per-block reference.)
    """
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):  # Qwen3: per-head RMSNorm on k before rotary
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return k * cos + _rotate_half(k) * sin, v


def _rms_parts(norm: nn.Module) -> tuple[Tensor, float] | None:
    """(weight, eps) of an RMSNorm computing weight * x * rsqrt(mean(x^2) + eps), else None."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if weight is None or eps is None or "RMSNorm" not in type(norm).__name__:
        return None
    if "Gemma" in type(norm).__name__:  # (1 + w) convention
        return None
    return weight.detach(), float(eps)


class KVPropagator:
    """CALM state propagation for all skipped blocks at once.

    Block s's cached k/v for an exit state h are W_{k,v}^s · (g_s ⊙ rms(h)) (+ bias), with
    g_s its input RMSNorm weight. rms(h) is the same for every s, so the norm weights are
    folded into the projections and the blocks first..L-1 are stacked into one
    [(L - first) · 2 · d_kv, H] matrix: an exit at j costs one matmul over the rows of
    blocks j..L-1, one batched (k_norm and) rotary, and the cache appends, instead of
    ~10 small ops per skipped block. Falls back to `propagated_kv` per block when a
    block's norm is not a plain RMSNorm.
    """

    def __init__(self, layers: Sequence[nn.Module], first: int) -> None:
        self.layers, self.first = layers, first
        attn0 = layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.d_kv = attn0.k_proj.weight.shape[0]
        parts = [_rms_parts(layer.input_layernorm) for layer in layers[first:]]
        self.fused = bool(parts) and all(p is not None for p in parts) and len(
            {p[1] for p in parts}) == 1 and all(
            layer.self_attn.k_proj.weight.shape[0] == self.d_kv for layer in layers[first:])
        if not self.fused:
            return
        self.eps = parts[0][1]
        rows, biases = [], []
        for layer, (g, _) in zip(layers[first:], parts, strict=True):
            attn = layer.self_attn
            rows.append(torch.cat([attn.k_proj.weight, attn.v_proj.weight]).detach() * g)
            kb, vb = attn.k_proj.bias, attn.v_proj.bias
            biases.append(None if kb is None else torch.cat([kb, vb]).detach())
        self.weight = torch.cat(rows)  # [(L - first) * 2 d_kv, H]
        self.bias = None if biases[0] is None else torch.cat(biases)
        k_norms = [getattr(layer.self_attn, "k_norm", None) for layer in layers[first:]]
        self.k_norm = None
        if k_norms[0] is not None:
            kparts = [_rms_parts(n) for n in k_norms]
            if any(p is None for p in kparts):
                self.fused = False
                return
            self.k_norm = (torch.stack([p[0] for p in kparts])[:, None, :], kparts[0][1])

    def __call__(self, cache: object, h: Tensor, start: int, cos: Tensor, sin: Tensor) -> None:
        """Append K/V of blocks start..L-1 for exit state h [1, 1, H] to `cache`."""
        L = len(self.layers)
        if not self.fused or start < self.first:
            for s in range(start, L):
                k, v = propagated_kv(self.layers[s], h, cos, sin)
                cache.update(k, v, s)
            return
        x = h.reshape(-1).float()
        x = (x * torch.rsqrt(x.pow(2).mean() + self.eps)).to(h.dtype)
        lo = (start - self.first) * 2 * self.d_kv
        bias = None if self.bias is None else self.bias[lo:]
        kv = nn.functional.linear(x, self.weight[lo:], bias).view(L - start, 2, -1, self.head_dim)
        k, v = kv[:, 0], kv[:, 1]  # [n, heads, head_dim]
        if self.k_norm is not None:
            w, eps = self.k_norm
            kf = k.float()
            k = (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + eps)).to(k.dtype) * w[
                start - self.first:]
        cos, sin = cos.reshape(1, 1, -1), sin.reshape(1, 1, -1)
        k = k * cos + _rotate_half(k) * sin
        for i, s in enumerate(range(start, L)):
            cache.update(k[i, None, :, None], v[i, None, :, None], s)


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


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None,
          gen: torch.Generator | None) -> int:
    """Greedy or sampled token id from logits [V]."""
    logits = logits.reshape(-1).float()
    if not do_sample:
        best = int(torch.argmax(logits))
    else:
        scaled = logits / temperature
        if top_k is not None and top_k < scaled.shape[0]:
            kth = torch.topk(scaled, top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        best = int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen))
    return best


@torch.no_grad()
def generate(
    adapter: object,
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
    force_exit_layer: int | None = None,
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
    top of the CALM rule that trades exits for exit precision (0: the plain CALM rule). avg_input_len: the rule's N
    (default: this prompt's length).
    stop_tokens: default the model's EOS ids; () never stops early.
    force_exit_layer: testing hook, every decode step exits at this layer.
    Returns a GenerationResult (and the DynamicCache when return_cache=True).
    """
    from transformers import DynamicCache

    lam = check_lambda(lam)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if patience < 0:
        raise ConfigError(f"patience must be >= 0, got {patience}")
    embed, rotary = _model_parts(adapter)
    L = adapter.n_layers
    uses_lens = lam is not None or force_exit_layer is not None
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
    if force_exit_layer is not None:
        if not 1 <= force_exit_layer < L:
            raise ConfigError(f"force_exit_layer must be in 1..{L - 1}, got {force_exit_layer}")
        checks = {force_exit_layer}
    checker = None
    if uses_lens:
        options = {"static": screen_static} if check in ("screened", "shortlist") else {}
        checker = make_check(lens, check, **options)
    else:
        checks = set()
    # Fused K/V propagation for the blocks after the first exit layer (model preparation,
    # done once per call before the clock starts: a few MB of weights copied).
    propagate = KVPropagator(adapter.layers, min(checks)) if checks else None

    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ShapeError("the prompt is empty")
    if int(ids.max()) >= embed.num_embeddings or int(ids.min()) < 0:
        raise ShapeError("prompt token id out of the model's vocabulary: tokenizer/model mismatch?")
    ids = ids.to(adapter.device)
    if stop_tokens is None:
        eos = getattr(getattr(adapter.model, "generation_config", None), "eos_token_id", None)
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stop = set(int(t) for t in stop_tokens)
    N = float(avg_input_len) if avg_input_len is not None else float(ids.shape[1])
    gen = torch.Generator(device="cpu").manual_seed(seed) if do_sample else None

    # Prefill: the full model fills every layer's cache; its last logits give token 0.
    t0 = time.perf_counter()
    cache = DynamicCache(config=adapter.model.config)
    out = adapter.model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = _pick(out.logits[0, -1], do_sample, temperature, top_k, gen)
    if checker is not None:
        checker.reset(ids[0].tolist())
        checker.observe(token, out.logits[0, -1])
    t1 = time.perf_counter()
    tokens, exits, n_checks, n_full = [token], [L], 0, 0
    pos = ids.shape[1]
    layers = adapter.layers
    while len(tokens) < max_new_tokens and token not in stop:
        step = len(tokens)
        h = embed(torch.tensor([[token]], device=adapter.device))
        position_ids = torch.tensor([[pos]], device=adapter.device)
        cos, sin = rotary(h, position_ids)
        threshold = float("-inf") if force_exit_layer else calm_threshold(lam or 0.0, step, N)
        result: CheckResult | None = None
        exit_at, prev_top, streak = L, -1, 0
        for j in range(L):
            h = layers[j](h, attention_mask=None, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, position_embeddings=(cos, sin))
            if j + 1 in checks:
                result = checker(h[0, 0], j + 1, max(threshold, per_layer.get(j + 1, threshold)))
                n_checks += 1
                n_full += result.full
                streak = streak + 1 if result.top1 == prev_top else 0
                prev_top = result.top1
                if result.exit and (streak >= patience or force_exit_layer is not None):
                    exit_at = j + 1
                    break
        if exit_at < L:
            propagate(cache, h, exit_at, cos, sin)
            logits = result.logits
        else:
            logits = adapter.final_logits(h[0, 0])
        token = _pick(logits, do_sample, temperature, top_k, gen)
        if checker is not None:
            checker.observe(token, logits)
        tokens.append(token)
        exits.append(exit_at)
        pos += 1
    t2 = time.perf_counter()

    tok = getattr(adapter, "tokenizer", None)
    text = tok.decode(tokens, skip_special_tokens=True) if tok is not None else None
    settings = {"lambda": lam, "exit_layers": sorted(checks),
                "check": getattr(checker, "name", None),
                "screen_static": screen_static if check in ("screened", "shortlist") else None,
                "patience": patience,
                "layer_thresholds": per_layer or None,
                "do_sample": do_sample, "N": N}
    result_obj = GenerationResult(
        prompt_ids=ids[0].tolist(), tokens=tokens, exit_layers=exits, n_layers=L,
        n_checks=n_checks, n_full_checks=n_full, prefill_seconds=t1 - t0, decode_seconds=t2 - t1, text=text,
        settings=settings,
    )
    return (result_obj, cache) if return_cache else result_obj
