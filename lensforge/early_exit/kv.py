"""CALM state propagation: the K/V a skipped block caches for a token that exited early.

For each skipped block s, the entry for the exiting position is computed from the exit
state h_j: only block s's input norm, k/v projections (+ per-head k_norm where the family
has one) and rotary on k. Later tokens then attend to every layer's cache as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import Cache


class KVAttention(Protocol):
    """The attention module parts CALM's state propagation reads (self_attn)."""

    head_dim: int
    k_proj: nn.Linear
    v_proj: nn.Linear


class DecoderLayer(Protocol):
    """A Hugging Face decoder layer as the early-exit loop uses it (families.resolve checks
    a model's layers have these parts before the loop runs)."""

    self_attn: KVAttention
    input_layernorm: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def propagated_kv(layer: DecoderLayer, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
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

    def __init__(self, layers: Sequence[DecoderLayer], first: int) -> None:
        self.layers, self.first = layers, first
        attn0 = layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.d_kv = attn0.k_proj.weight.shape[0]
        maybe_parts = [_rms_parts(layer.input_layernorm) for layer in layers[first:]]
        parts = [p for p in maybe_parts if p is not None]
        self.fused = bool(parts) and len(parts) == len(maybe_parts) and len(
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
        self.k_norm: tuple[Tensor, float] | None = None
        if k_norms[0] is not None:
            maybe_kparts = [None if n is None else _rms_parts(n) for n in k_norms]
            kparts = [p for p in maybe_kparts if p is not None]
            if len(kparts) != len(maybe_kparts):
                self.fused = False
                return
            self.k_norm = (torch.stack([p[0] for p in kparts])[:, None, :], kparts[0][1])

    def __call__(self, cache: Cache, h: Tensor, start: int, cos: Tensor, sin: Tensor) -> None:
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
