"""Sparse ("subset") KL training loss: the target's top-k tokens plus a sampled tail.

A drop-in for `fast_loss.fused_kl_loss_backward` (same arguments, same return value,
same gradient accumulation) that never does V-wide work per lens row. For each lens
row r (a layer of a lens) and token t, with target p_t and lens logits z = quirks(x W_Uᵀ+b):

    KL(p_t || softmax(z)) = Σ_v p log p  -  Σ_v p z  +  log Z,   Z = Σ_v e^{z_v}

* Σ_v p log p (the target's negative entropy): exact, from the one V-wide target pass
  per token chunk that all layers and lenses share.
* Σ_v p z: by default the exact sum over the head S_t plus an unbiased
  importance-sampled estimate over the tail, from the same sampled ids as log Z. Using
  the same ids makes the tail's gradient terms (q̂ - p̂) share their sampling noise, so
  it trains better than the exact cross term (measured, see docs/subset_kl.md). With
  `exact_cross` and no soft-cap it is exact, s·(x·(p W_U) + p·b), at the price of one
  more V-wide GEMM per token chunk.
* log Z: Z = Σ_{v∈S_t} e^{z_v} (exact, S_t = the target's top-k tokens of token t)
  + an importance-sampled estimate of the tail Σ_{v∉S_t} e^{z_v} from m ids drawn
  (with replacement) from a proposal ρ shared by the chunk's tokens:
  ρ = (1-α)·(chunk-summed target tail probabilities, normalized) + α·uniform. A drawn
  id that is in S_t counts zero for token t, so Ẑ_t is unbiased for Z_t.

Cost per lens row: a batched [1, H] x [H, k] product per token (each token's own head
rows of W_U, gathered once per chunk) and one [rows, H] x [H, m] GEMM for the shared
tail, forward and backward: ~2H(k+m) multiply-adds instead of 2HV. `SubsetKL` computes
dKL/dx in the forward pass (as `fast_loss.UnembedKL` does); `subset_kl` is the same
estimator in plain autograd, kept as its readable statement and test oracle.

Bias (stated plainly; the held-out KL is always measured exactly, never with this):
* log Ẑ is the log of an unbiased estimate, so E[log Ẑ] <= log Z (Jensen): the loss
  is biased low, by about Var(Ẑ)/(2Z²) — small when the lens puts little mass outside
  the target's top-k or the proposal matches it, large for a lens far from the target
  (early layers, early training).
* Its gradient, e^{z_v}/Ẑ per sampled logit, is a self-normalized importance-sampling
  estimate of softmax(z): consistent but biased at finite m (O(1/m)).
* The cross term Σ p z and its gradient are unbiased (the sampled tail part is linear
  in the sampled terms), or exact with `exact_cross` (no soft-cap).
* With k >= V the loss is exact (no tail) and matches the fused loss to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lensforge.errors import NonFiniteError
from lensforge.lenses.base import Lens
from lensforge.lenses.readout import Readout
from lensforge.training import fast_loss

if TYPE_CHECKING:
    from lensforge.models.adapter import Unembed

DEFAULT_K = 128
DEFAULT_TAIL_SAMPLES = 256
DEFAULT_UNIFORM_MIX = 0.5


class ChunkTarget:
    """The target side of one token chunk, shared by every layer and lens.

    head_idx [C, k] ids of the target's top-k; head_p [C, k] their probabilities;
    neg_entropy [C]; p_w [C, H] = p W_U and p_b [C] = p·b (None with a soft-cap); tail_idx [m] sampled ids;
    tail_logw [C, m] log importance weight of each sample for each token (-inf where the
    id is in that token's head); tail_p [C, m] target probabilities of the samples.
    """

    def __init__(self, final_h: Tensor, unembed: Unembed, weight: Tensor,
                 bias: Tensor | None, k: int, tail_samples: int, uniform_mix: float,
                 generator: torch.Generator | None, workspace: fast_loss.Workspace,
                 exact_cross: bool = False) -> None:
        scale, softcap = fast_loss._quirks(unembed)
        with torch.no_grad():
            x = unembed.norm(final_h.to(unembed.weight.dtype)).to(weight.dtype)
            C, V = x.shape[0], weight.shape[0]
            z = fast_loss._logits(x, weight, bias, scale, softcap,
                                  out=workspace.get("z", C, V, x.device))
            z.sub_(z.amax(-1, keepdim=True))  # z - max; in place, as are p's steps
            p = torch.exp(z, out=workspace.get("p", C, V, x.device))
            log_s = p.sum(-1).log_()
            p.div_(log_s.exp()[:, None])
            # Σ p log p = Σ p (z - max) - log Σ exp(z - max), since Σ p = 1.
            self.neg_entropy = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(C) - log_s
            head_z, self.head_idx = torch.topk(z, min(k, V), dim=-1)
            self.head_p = (head_z - log_s[:, None]).exp_()
            self.p_w: Tensor | None = None
            self.p_b: Tensor | None = None
            if softcap is None and exact_cross:
                # bf16 matmul when the loss runs in bf16: no fp32 copy of W_U per chunk.
                self.p_w = (p.to(weight.dtype) @ weight).float()
                if bias is not None:
                    self.p_b = p @ bias.float()
            self.tail_idx: Tensor | None = None
            self.tail_logw: Tensor | None = None
            self.tail_p: Tensor | None = None
            if k < V and tail_samples > 0:
                self._sample_tail(p, V, tail_samples, uniform_mix, generator)
            # W_U rows (and bias) of each token's head and of the shared tail, gathered
            # once per chunk in the compute dtype; every layer and lens reuses them.
            H = weight.shape[1]
            self.w_head = weight.index_select(0, self.head_idx.flatten()).view(C, -1, H)
            self.b_head = None if bias is None else bias.float()[self.head_idx]
            self.w_tail: Tensor | None = None
            self.b_tail: Tensor | None = None
            self.tail_pw: Tensor | None = None
            if self.tail_idx is not None:
                assert self.tail_p is not None and self.tail_logw is not None  # set together
                self.w_tail = weight.index_select(0, self.tail_idx)
                self.b_tail = None if bias is None else bias.float()[self.tail_idx]
                # Importance-weighted target probability of each sample (0 inside the head).
                self.tail_pw = self.tail_p * self.tail_logw.exp()

    def _sample_tail(self, p: Tensor, V: int, m: int, uniform_mix: float,
                     generator: torch.Generator | None) -> None:
        # Target tail mass per id, summed over the chunk's tokens (head entries removed).
        tail = p.sum(0)
        tail.index_add_(0, self.head_idx.flatten(), -self.head_p.flatten()).clamp_min_(0)
        total = float(tail.sum())
        rho = torch.full_like(tail, 1.0 / V)
        if total > 0:
            rho.mul_(uniform_mix).add_(tail, alpha=(1.0 - uniform_mix) / total)
        gen_device = generator.device if generator is not None else p.device
        idx = torch.multinomial(rho.to(gen_device), m, replacement=True,
                                generator=generator).to(p.device)
        in_head = (self.head_idx[:, :, None] == idx[None, None, :]).any(1)  # [C, m]
        logw = (-(rho[idx] * m).log()).expand_as(in_head)
        self.tail_idx = idx
        self.tail_logw = logw.masked_fill(in_head, -math.inf)
        self.tail_p = p[:, idx]


def _quirked(z: Tensor, bias: Tensor | None, scale: float, softcap: float | None) -> Tensor:
    """fp32 logits with bias, scale and soft-cap applied (autograd-friendly, not in place)."""
    z = z.float()
    if bias is not None:
        z = z + bias
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def subset_kl(x: Tensor, target: ChunkTarget, weight: Tensor, scale: float,
              softcap: float | None) -> Tensor:
    """Estimated KL(p || q) per row: x [R, C, H] normed states -> [R, C] fp32.

    The plain-autograd statement of the estimator: `SubsetKL` computes the same values
    and gradient fused (fewer passes); tests check the two agree.
    """
    R, C, H = x.shape
    xc = x.to(weight.dtype)
    # Each token against its own head rows: [C, R, H] x [C, H, k] -> [C, R, k].
    z_head = torch.bmm(xc.transpose(0, 1), target.w_head.transpose(1, 2)).transpose(0, 1)
    z_head = _quirked(z_head, target.b_head, scale, softcap)  # [R, C, k]
    parts = [z_head]
    z_tail = None
    if target.w_tail is not None:
        assert target.tail_logw is not None  # sampled with w_tail
        z_tail = _quirked((xc.reshape(R * C, H) @ target.w_tail.T).view(R, C, -1),
                          target.b_tail, scale, softcap)
        parts.append(z_tail + target.tail_logw)
    log_z = torch.logsumexp(torch.cat(parts, -1), -1)  # [R, C]
    if target.p_w is not None:
        pz = (x.float() * target.p_w).sum(-1)
        if target.p_b is not None:
            pz = pz + target.p_b
        pz = pz * scale
    else:
        pz = (z_head * target.head_p).sum(-1)
        if z_tail is not None:
            assert target.tail_pw is not None  # sampled with w_tail
            pz = pz + (z_tail * target.tail_pw).sum(-1)
    return target.neg_entropy - pz + log_z


def _capped(z: Tensor, bias: Tensor | None, scale: float, softcap: float | None
            ) -> tuple[Tensor, Tensor | None]:
    """In-place quirks on fp32 logits; returns them and d(cap)/d(pre-cap) (or None)."""
    if bias is not None:
        z += bias
    if scale != 1.0:
        z *= scale
    if softcap is None:
        return z, None
    z.div_(softcap).tanh_()
    slope = 1.0 - z.square()  # d(cap·tanh(l/cap))/dl
    return z.mul_(softcap), slope


class SubsetKL(torch.autograd.Function):
    """`subset_kl` with its gradient computed in the forward pass, as `UnembedKL` does:
    one pass over the [R, C, k + m] logits gives the KL and dKL/dz, then two products
    with the gathered W_U rows give dKL/dx [R, C, H], which backward only scales."""

    @staticmethod
    def forward(ctx, x: Tensor, target: ChunkTarget, weight: Tensor, scale: float,
                softcap: float | None, need_grad: bool) -> Tensor:
        R, C, H = x.shape
        xc = x.detach().to(weight.dtype)
        # [C, R, k], fp32: head logits, each token against its own rows.
        zh, slope_h = _capped(
            torch.bmm(xc.transpose(0, 1), target.w_head.transpose(1, 2)).float(),
            None if target.b_head is None else target.b_head[:, None], scale, softcap)
        mx = zh.amax(-1)  # [C, R]
        zt = slope_t = lt = None
        if target.w_tail is not None:
            assert target.tail_logw is not None  # sampled with w_tail
            # [C, R, m] via the [R*C, m] GEMM, viewed token-major.
            zt, slope_t = _capped((xc.reshape(R * C, H) @ target.w_tail.T).float()
                                  .view(R, C, -1).transpose(0, 1), target.b_tail, scale,
                                  softcap)
            lt = zt + target.tail_logw[:, None]
            mx = torch.maximum(mx, lt.amax(-1))
        eh = (zh - mx[..., None]).exp_()
        total = eh.sum(-1)
        et = None
        if lt is not None:
            et = lt.sub_(mx[..., None]).exp_()
            total += et.sum(-1)
        lse = mx + total.log()
        if target.p_w is not None:
            pz = torch.einsum("rch,ch->cr", x.detach().float(), target.p_w)
            if target.p_b is not None:
                pz += target.p_b[:, None]
            pz *= scale
        else:
            pz = (zh * target.head_p[:, None]).sum(-1)
            if zt is not None:
                assert target.tail_pw is not None  # sampled with w_tail
                pz += (zt * target.tail_pw[:, None]).sum(-1)
        kl = (target.neg_entropy[:, None] - pz + lse).T  # [R, C]
        grad = None
        if need_grad:
            inv = total.reciprocal()[..., None]
            gh = eh.mul_(inv)  # q over the head (self-normalized), then minus p
            if target.p_w is None:
                gh.sub_(target.head_p[:, None])
            if slope_h is not None:
                gh.mul_(slope_h)
            grad = torch.bmm(gh.to(weight.dtype), target.w_head).float()  # [C, R, H]
            if et is not None:
                assert target.tail_pw is not None and target.w_tail is not None  # as zt
                gt = et.mul_(inv)
                if target.p_w is None:
                    gt.sub_(target.tail_pw[:, None])
                if slope_t is not None:
                    gt.mul_(slope_t)
                # [C, R, m] -> [R*C, m] rows in x's order for one GEMM.
                gt = gt.transpose(0, 1).reshape(R * C, -1).to(weight.dtype)
                grad = grad.transpose(0, 1) + (gt @ target.w_tail).float().view(R, C, H)
            else:
                grad = grad.transpose(0, 1)
            if target.p_w is not None:
                grad = grad - target.p_w  # d(-Σ p z)/dx without the scale, applied next
            if scale != 1.0:
                grad = grad * scale
        ctx.save_for_backward(grad)
        ctx.x_dtype = x.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("SubsetKL was run without need_grad; cannot backpropagate")
        return (grad * grad_kl[..., None]).to(ctx.x_dtype), None, None, None, None, None


def subset_kl_loss_backward(
    lenses: Mapping[str, Lens],
    hs: Tensor,
    final_h: Tensor,
    unembed: Unembed,
    *,
    scale: float = 1.0,
    token_chunk: int = 2048,
    backward: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    k: int = DEFAULT_K,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    uniform_mix: float = DEFAULT_UNIFORM_MIX,
    exact_cross: bool = False,
    generator: torch.Generator | None = None,
    block_bytes: int | None = None,
    workspace: fast_loss.Workspace | None = None,
    readout: Readout | None = None,
) -> dict[str, Tensor]:
    """Drop-in for `fast_loss.fused_kl_loss_backward` with the subset KL estimate.

    Accumulates gradients of mean-over-tokens, sum-over-layers estimated KL for each lens;
    returns per-lens per-layer mean estimated KL [L] (fp32, nats). hs: [L, N, H];
    final_h: [N, H] pre-norm final residual. `k`: target top-k tokens per token (k >= V
    is the exact loss); `tail_samples`: m tail ids drawn per token chunk (needed when
    k < V); `uniform_mix`: α, the uniform share of the tail proposal; `exact_cross`:
    compute Σ_v p z exactly via p W_U (one more [chunk, V] x [V, H] GEMM per chunk, no
    soft-cap only) instead of head-exact + sampled tail (the default: faster, and it
    trained to a lower held-out KL in tests/test_subset_loss.py); `generator`: seeds
    the tail draws (same seed, same loss and gradients). See the module docstring for
    the estimator and its bias. `token_chunk`, `compute_dtype`, `block_bytes`,
    `workspace`, `readout`: as in the fused loss.
    """
    L, N, H = hs.shape
    names = list(lenses)
    if not names:
        return {}
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < uniform_mix <= 1.0:
        # α > 0 keeps every tail id drawable, which unbiasedness of Ẑ needs.
        raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix}")
    dtype = fast_loss.compute_dtype_for(unembed, compute_dtype)
    weight = fast_loss.unembed_weight(unembed, dtype, readout)
    bias = None if unembed.bias is None else unembed.bias.detach()
    scale_logit, softcap = fast_loss._quirks(unembed)
    V = weight.shape[0]
    if k < V and tail_samples < 1:
        # Without a tail, log Σ_head e^z under-counts Z and the lens could lower the
        # "loss" by moving mass off the head: refuse rather than train on that.
        raise ValueError("tail_samples must be >= 1 when k < vocabulary size")
    if block_bytes is None:
        block_bytes = fast_loss.DEFAULT_BLOCK_BYTES.get(
            hs.device.type, fast_loss.DEFAULT_BLOCK_BYTES["cuda"])
    # The target pass holds two [chunk, V] fp32 buffers; nothing per lens row is V-wide.
    chunk = max(1, min(token_chunk, N, block_bytes // (V * 4)))
    model_dtype = unembed.weight.dtype
    totals = torch.zeros(len(names), L, dtype=torch.float64)
    # As in the fused loss: the readout's buffers when the caller keeps one, else this call's.
    ws = workspace or (readout.workspace if readout is not None else fast_loss.Workspace())
    for start in range(0, N, chunk):
        sl = slice(start, min(N, start + chunk))
        target = ChunkTarget(final_h[sl], unembed, weight, bias, k, tail_samples, uniform_mix,
                             generator, ws, exact_cross)
        h = hs[:, sl].float()
        with torch.set_grad_enabled(backward and torch.is_grad_enabled()):
            states = torch.cat([lenses[n].transform_all(h) for n in names])  # [nL*L, C, H]
            normed = unembed.norm(states.to(model_dtype))
            need_grad = normed.requires_grad
            kl = SubsetKL.apply(normed, target, weight, scale_logit, softcap, need_grad)
            per_layer = kl.view(len(names), L, -1).sum(-1)  # [nL, L]
            if not torch.isfinite(per_layer).all():
                bad = torch.nonzero(~torch.isfinite(per_layer))[0].tolist()
                raise NonFiniteError(
                    f"non-finite loss at layer {bad[1]} of lens '{names[bad[0]]}'; lower the "
                    "learning rate or use --dtype float32"
                )
            if need_grad:
                (per_layer.sum() * (scale / N)).backward()
        totals += per_layer.detach().double().cpu()
    return {name: (totals[i] / N).float() for i, name in enumerate(names)}
