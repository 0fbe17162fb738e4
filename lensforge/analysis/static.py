"""Static analysis of parameters through a lens (Tuned Lens paper §E / Table 3 analogue).

T(W) = top-k tokens of unembed(f_l(v)) for vectors v taken from the weights:
  * `mlp_out`: the rows written by block l's MLP (columns of its down projection);
  * `ov_out`:  per head, the top left singular vectors of W_O^h W_V^h (what the head writes);
  * `ov_in`:   the matching right singular vectors (what the head reads).
What a block writes lives in the residual stream entering block l+1, so `mlp_out`/`ov_out`
are read with the lens at l+1 (the model's own unembedding for the last block); `ov_in`
with the lens at l.

f_l (our choice): the lens's *linear* part, f_l(v) = v + A_l v (the bias b_l is dropped,
since it is the lens's prediction for an empty residual, not a property of v), then the
model's final norm and W_U. For the logit lens f_l(v) = v: the classic W_U·norm(v).

Coherence of a token list = mean pairwise cosine (i != j) of the tokens' *input*
embeddings; the paper used BPEmb, which is not available offline. Random Gaussian
vectors through the same lens and layer are the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch
from torch import Tensor, nn

from lensforge.errors import ConfigError, UnsupportedModelError
from lensforge.lenses import Lens

if TYPE_CHECKING:
    from lensforge.models.adapter import ModelAdapter

# Leaf names of the modules we need, across families (llama/mistral/qwen/gemma/olmo/phi3,
# gpt2, gpt-neox, phi, opt...). The parent name disambiguates gpt2's two `c_proj`s.
MLP_OUT_NAMES = ("down_proj", "dense_4h_to_h", "fc2", "w2", "c_proj", "fc_out")
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "ff")
ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
ATTN_PARENTS = ("self_attn", "attn", "attention", "self_attention")
VALUE_NAMES = ("v_proj", "value")
FUSED_QKV_NAMES = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")


@dataclass
class BlockWeights:
    """Weights of one block in canonical form (out x in, like nn.Linear)."""

    mlp_out: Tensor  # [H, d_ff]: column j is the vector neuron j writes
    w_o: Tensor      # [H, n_heads * d_head]
    w_v: Tensor      # [n_kv_heads * d_head, H]
    n_heads: int
    n_kv_heads: int
    d_head: int


def _find(block: nn.Module, names: Sequence[str], parents: Sequence[str]) -> tuple[str, nn.Module] | None:
    for name in names:
        for path, module in block.named_modules():
            parts = path.split(".")
            if parts[-1] == name and (len(parts) == 1 or parts[-2] in parents):
                return path, module
    return None


def _linear_weight(module: nn.Module) -> Tensor:
    """[out, in] weight of nn.Linear or GPT-2's Conv1D (which stores [in, out])."""
    w = cast(Tensor, module.weight).detach()
    if type(module).__name__ == "Conv1D":
        return w.T
    return w


def block_weights(adapter: ModelAdapter, layer: int) -> BlockWeights:
    """Find the MLP down projection and attention value/output maps of block `layer`."""
    block = adapter.layers[layer]
    cfg = adapter.config
    H = adapter.hidden_size
    n_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    d_head = int(getattr(cfg, "head_dim", None) or H // n_heads)
    where = f"block {layer} ({type(block).__name__})"
    mlp = _find(block, MLP_OUT_NAMES, MLP_PARENTS)
    attn_out = _find(block, ATTN_OUT_NAMES, ATTN_PARENTS)
    if mlp is None:
        raise UnsupportedModelError(
            f"no MLP output projection in {where}: looked for {'/'.join(MLP_OUT_NAMES)} "
            f"under {'/'.join(MLP_PARENTS)}")
    if attn_out is None:
        raise UnsupportedModelError(
            f"no attention output projection in {where}: looked for {'/'.join(ATTN_OUT_NAMES)} "
            f"under {'/'.join(ATTN_PARENTS)}")
    value = _find(block, VALUE_NAMES, ATTN_PARENTS)
    if value is not None:
        w_v = _linear_weight(value[1])
    else:
        fused = _find(block, FUSED_QKV_NAMES, ATTN_PARENTS)
        if fused is None:
            raise UnsupportedModelError(
                f"no attention value projection in {where}: looked for "
                f"{'/'.join(VALUE_NAMES + FUSED_QKV_NAMES)} under {'/'.join(ATTN_PARENTS)}")
        w_v = _split_value(fused[0].split(".")[-1], _linear_weight(fused[1]), n_heads, n_kv, d_head)
    mlp_w = _linear_weight(mlp[1])
    w_o = _linear_weight(attn_out[1])
    if mlp_w.shape[0] != H or w_o.shape != (H, n_heads * d_head) or w_v.shape != (n_kv * d_head, H):
        raise UnsupportedModelError(
            f"unexpected weight shapes in {where}: mlp out {tuple(mlp_w.shape)}, o {tuple(w_o.shape)}, "
            f"v {tuple(w_v.shape)} (H={H}, heads={n_heads}, kv heads={n_kv}, head dim={d_head})")
    return BlockWeights(mlp_w.float(), w_o.float(), w_v.float(), n_heads, n_kv, d_head)


def _split_value(name: str, w: Tensor, n_heads: int, n_kv: int, d_head: int) -> Tensor:
    """The value rows of a fused q/k/v weight [(q + k + v) rows, H]."""
    if name == "query_key_value":  # gpt-neox interleaves per head: [heads, (q, k, v), d_head]
        return w.reshape(n_heads, 3, d_head, -1)[:, 2].reshape(n_heads * d_head, -1)
    q, kv = n_heads * d_head, n_kv * d_head
    return w[q + kv:q + 2 * kv]  # c_attn / qkv_proj / Wqkv: [q; k; v] stacked


def ov_matrices(weights: BlockWeights) -> Tensor:
    """Per-head OV circuits W_O^h W_V^{kv(h)}: [n_heads, H, H]. With grouped-query
    attention, head h reads kv head h // (n_heads / n_kv)."""
    group = weights.n_heads // weights.n_kv_heads
    d = weights.d_head
    mats = []
    for h in range(weights.n_heads):
        kv = h // group
        mats.append(weights.w_o[:, h * d:(h + 1) * d] @ weights.w_v[kv * d:(kv + 1) * d])
    return torch.stack(mats)


def parameter_vectors(adapter: ModelAdapter, layer: int, kind: str, *, n_singular: int = 4,
                      max_vectors: int | None = None, seed: int = 0) -> tuple[Tensor, list[str]]:
    """Vectors [n, H] of kind mlp_out / ov_out / ov_in from block `layer`, with labels."""
    w = block_weights(adapter, layer)
    if kind == "mlp_out":
        vecs = w.mlp_out.T
        labels = [f"L{layer}.mlp.{j}" for j in range(vecs.shape[0])]
    elif kind in ("ov_out", "ov_in"):
        U, _, Vh = torch.linalg.svd(ov_matrices(w))
        k = min(n_singular, w.d_head)
        vecs = (U[:, :, :k].transpose(1, 2) if kind == "ov_out" else Vh[:, :k]).reshape(-1, U.shape[1])
        labels = [f"L{layer}.h{h}.{kind}.sv{i}" for h in range(w.n_heads) for i in range(k)]
    else:
        raise ConfigError(f"unknown parameter kind '{kind}' (mlp_out, ov_out, ov_in)")
    if max_vectors is not None and vecs.shape[0] > max_vectors:
        keep = torch.randperm(vecs.shape[0], generator=torch.Generator().manual_seed(seed))[:max_vectors]
        keep = keep.sort().values
        vecs, labels = vecs[keep], [labels[i] for i in keep.tolist()]
    return vecs, labels


def lens_index(adapter: ModelAdapter, layer: int, kind: str) -> int:
    """Residual index the vector lives in: l+1 for what block l writes, l for what it reads."""
    return layer if kind == "ov_in" else layer + 1


@torch.no_grad()
def lens_logits_of_vectors(lens: Lens, adapter: ModelAdapter, vectors: Tensor, idx: int) -> Tensor:
    """unembed(v + A_idx v) for vectors [n, H] -> logits [n, V] (float32). idx = L uses the
    model's own unembedding (the lens is the identity there)."""
    v = vectors.to(adapter.device, adapter.dtype)
    if idx < adapter.n_layers:
        # Linear part only: transform(v) - delta(0) removes the lens's bias.
        v = lens.transform_hidden(v, idx) - lens.delta(torch.zeros_like(v[:1]), idx)
    return adapter.unembed(v).float()


def orient(vectors: Tensor, adapter: ModelAdapter) -> Tensor:
    """Fix the arbitrary sign of singular vectors: flip each so that its logit-lens
    projection promotes (max) more strongly than it suppresses (-min)."""
    logits = vectors.to(adapter.dtype) @ adapter.unembed.weight.T
    sign = torch.where(logits.max(-1).values >= -logits.min(-1).values, 1.0, -1.0)
    return vectors * sign.to(vectors.dtype)[:, None]


def top_tokens(logits: Tensor, k: int) -> Tensor:
    """[n, V] -> the k highest-logit token ids per row, [n, k]."""
    return logits.topk(k, dim=-1).indices


class StaticRow(TypedDict):
    """Mean coherence of T(W) for one lens, kind and layer (keys in this order)."""

    lens: str
    kind: str  # mlp_out, ov_out or ov_in
    layer: int
    lens_index: int  # the lens layer that reads the vectors
    n_vectors: int
    coherence_real: float
    coherence_random: float  # Gaussian vectors through the same lens and layer
    real_minus_random: float


class StaticExample(TypedDict):
    """One of the most coherent decoded token lists (keys in this order)."""

    lens: str
    kind: str
    layer: int
    vector: str  # which parameter vector
    coherence: float
    tokens: list[str]


class StaticStudy(TypedDict):
    """What `static_study` returns."""

    rows: list[StaticRow]
    examples: list[StaticExample]  # the 3 most coherent per (lens, kind, layer)


def coherence(token_ids: Tensor, embeddings: Tensor) -> Tensor:
    """Mean pairwise cosine (i != j) of the embeddings of each row's tokens: [n, k] -> [n].

    (The paper averages over all k^2 pairs including i = j: theirs = (1 + (k-1) ours) / k.)"""
    k = token_ids.shape[-1]
    if k < 2:
        raise ConfigError("coherence needs at least two tokens per list (top-k >= 2)")
    e = nn.functional.normalize(embeddings.float()[token_ids], dim=-1)  # [n, k, H]
    gram = e @ e.transpose(1, 2)
    return (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / (k * (k - 1))


def static_study(adapter: ModelAdapter, lenses: dict[str, Lens], layers: Sequence[int], *,
                 kinds: Sequence[str] = ("mlp_out", "ov_out", "ov_in"), top_k: int = 10,
                 n_singular: int = 4, max_vectors: int | None = 256, seed: int = 0,
                 chunk: int = 256) -> StaticStudy:
    """Coherence of T(W) for real and random vectors, per lens, kind and layer.

    Returns {"rows": [per (lens, kind, layer): mean coherence real/random, n],
             "examples": [a few decoded token lists per (lens, kind, layer)]}."""
    if not lenses:
        raise ConfigError("no lenses given")
    for layer in layers:
        if not 0 <= layer < adapter.n_layers:
            raise ConfigError(f"layer {layer} out of range 0..{adapter.n_layers - 1}")
    emb = adapter.input_embeddings().weight.detach()
    tok = adapter.tokenizer
    gen = torch.Generator().manual_seed(seed)
    rows: list[StaticRow] = []
    examples: list[StaticExample] = []
    for layer in layers:
        for kind in kinds:
            vecs, labels = parameter_vectors(adapter, layer, kind, n_singular=n_singular,
                                             max_vectors=max_vectors, seed=seed)
            if kind != "mlp_out":
                vecs = orient(vecs, adapter)
            rand = torch.randn(vecs.shape, generator=gen)
            idx = lens_index(adapter, layer, kind)
            for name, lens in lenses.items():
                scores = {}
                for which, v in (("real", vecs), ("random", rand)):
                    ids = torch.cat([top_tokens(lens_logits_of_vectors(lens, adapter, v[i:i + chunk], idx),
                                                top_k) for i in range(0, len(v), chunk)])
                    scores[which] = coherence(ids.cpu(), emb.cpu())
                    if which == "real":
                        best = scores["real"].argsort(descending=True)[:3].tolist()
                        for j in best:
                            examples.append({"lens": name, "kind": kind, "layer": layer,
                                             "vector": labels[j], "coherence": float(scores["real"][j]),
                                             "tokens": _decode(tok, ids[j])})
                rows.append({"lens": name, "kind": kind, "layer": layer, "lens_index": idx,
                             "n_vectors": len(vecs), "coherence_real": float(scores["real"].mean()),
                             "coherence_random": float(scores["random"].mean()),
                             "real_minus_random": float(scores["real"].mean() - scores["random"].mean())})
    return {"rows": rows, "examples": examples}


def _decode(tokenizer: Any, ids: Tensor) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids.tolist()]
    return [tokenizer.decode([i]) for i in ids.tolist()]
