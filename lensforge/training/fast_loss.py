"""The fast training objective: all layers (and lenses) batched into large unembedding
matmuls, with the KL and its gradient fused so no [tokens x vocab] logits are kept.

Same contract as the reference `loss.kl_loss_backward` (which stays the oracle):

    hs [L, N, H] -> lens.transform_all (fp32, autograd) -> final norm (model dtype, autograd)
      -> UnembedKL: per block of rows, logits = x W_Uᵀ (+b) -> quirks -> fp32 log-softmax
         -> KL(p || q) per row, and, in the same pass, dKL/dx = ((q - p) * quirk') W_U

The gradient of a row's KL depends only on that row, so it is computed while the
logits are at hand and stored as an [rows, H] tensor; backward just scales it by the
upstream gradient. That is two matmuls per row (the floor for forward + input
gradient) instead of three (forward, recompute, backward) and memory of one block of
logits. The target's log-probs, its negative entropy and p·W_U are computed once per
token chunk and shared by every layer and every lens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lensforge.errors import NonFiniteError
from lensforge.lenses.base import Lens
from lensforge.lenses.readout import Readout, Workspace, compute_dtype_for, quirks

if TYPE_CHECKING:
    from lensforge.models.adapter import Unembed

__all__ = ["UnembedKL", "Workspace", "compute_dtype_for", "fused_kl_loss_backward",
           "lens_logits_by_layer", "target_stats", "unembed_weight"]

# Bytes of fp32 logits one block may hold. On CPU the block is small (a [128 x 49152]
# block is 24 MiB): a 128-row matmul already runs at the machine's GEMM rate, and the
# two reused workspaces (logits block, target p) bound the loss's extra memory.
DEFAULT_BLOCK_BYTES = {"cpu": 24 * 2**20, "cuda": 2 * 2**30}


def unembed_weight(unembed: Unembed, dtype: torch.dtype,
                   readout: Readout | None = None) -> Tensor:
    """W_U [V, H] in `dtype`: the readout's cached copy when it has that dtype, else a
    converted copy (no conversion in the default policy, where dtype = model dtype)."""
    if readout is not None and readout.dtype == dtype:
        return readout.weight
    w = unembed.weight.detach()
    return w if w.dtype == dtype else w.to(dtype).contiguous()


_quirks = quirks


def target_stats(final_h: Tensor, unembed: Unembed, weight: Tensor,
                 bias: Tensor | None, workspace: Workspace | None = None
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Target distribution of a token chunk, computed once for all layers and lenses.

    final_h: [C, H] pre-norm final residual. Returns p [C, V] fp32, its negative entropy
    Σ p log p [C] (nats), and p W_U [C, H] (None when a soft-cap makes it unusable).
    With a `workspace`, p lives in its "p" buffer (valid until the next call) and the
    logits in its "z" buffer: no [C, V] tensor is allocated.
    """
    model_dtype = unembed.weight.dtype
    with torch.no_grad():
        x = unembed.norm(final_h.to(model_dtype)).to(weight.dtype)
        C, V = x.shape[0], weight.shape[0]
        z_out = p = None
        if workspace is not None:
            z_out = workspace.get("z", C, V, x.device)
            p = workspace.get("p", C, V, x.device)
        z = _logits(x, weight, bias, *_quirks(unembed), out=z_out, workspace=workspace)
        z.sub_(z.amax(-1, keepdim=True))  # z - max
        p = torch.exp(z, out=p)
        log_s = p.sum(-1).log_()
        p.div_(log_s.exp()[:, None])
        # Σ p log p = Σ p (z - max) - log Σ exp(z - max), since Σ p = 1.
        neg_entropy = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(C) - log_s
        p_w = None
        if _quirks(unembed)[1] is None:
            # p W_U only enters the loss value (the gradient uses q - p over all of V), so
            # in bf16 it runs as a bf16 GEMM instead of widening all of W_U per chunk.
            p_w = p @ weight if weight.dtype == torch.float32 else (
                p.to(weight.dtype) @ weight).float()
    return p, neg_entropy, p_w


def _logits(x: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
            softcap: float | None, out: Tensor | None = None,
            workspace: Workspace | None = None) -> Tensor:
    """x [M, H] (already normed, compute dtype) -> fp32 logits [M, V] with quirks applied.

    `out`: an fp32 [M, V] buffer to write into. A low-precision matmul writes its
    [M, V] result into the workspace's "z_low" buffer first (CPU GEMMs cannot write
    fp32 from bf16 inputs), so no block allocates.
    """
    if out is not None and x.dtype == torch.float32 and weight.dtype == torch.float32:
        z = torch.mm(x, weight.T, out=out)
    elif out is not None and workspace is not None:
        low = workspace.get("z_low", x.shape[0], weight.shape[0], x.device, weight.dtype)
        z = out.copy_(torch.mm(x, weight.T, out=low))
    elif out is not None:
        z = out.copy_(x @ weight.T)
    else:
        z = (x @ weight.T).float()
    if bias is not None:
        z += bias.float()
    if scale != 1.0:
        z *= scale
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


class UnembedKL(torch.autograd.Function):
    """KL(p || softmax(quirks(x W_Uᵀ + b))) per row, gradient fused into the forward pass.

    x: [R, C, H] normed states (R = layers x lenses, C tokens); p: [C, V] shared by all R.
    Returns kl [R, C] fp32. Gradient flows to x only (W_U is frozen).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, p: Tensor,
                neg_entropy: Tensor, p_w: Tensor | None, scale: float,
                softcap: float | None, rows_per_block: int, need_grad: bool,
                workspace: Workspace | None = None) -> Tensor:
        R, C, H = x.shape
        V = weight.shape[0]
        kl = torch.empty(R, C, dtype=torch.float32, device=x.device)
        grad = torch.empty(R, C, H, dtype=torch.float32, device=x.device) if need_grad else None
        for r0 in range(0, R, rows_per_block):
            r1 = min(R, r0 + rows_per_block)
            xb = x[r0:r1].reshape(-1, H).to(weight.dtype)
            out = None if workspace is None else workspace.get("z", xb.shape[0], V, x.device)
            z = _logits(xb, weight, bias, scale, softcap, out=out, workspace=workspace).view(
                r1 - r0, C, -1)
            if p_w is not None:
                # Σ_v p z without another pass over [rows, V]: p·(s(x W_Uᵀ + b)).
                pz = (xb.float().view(r1 - r0, C, H) * p_w).sum(-1)
                if bias is not None:
                    pz += p @ bias.float()
                pz *= scale
            else:
                pz = (z * p).sum(-1)
            cap_grad = None
            if need_grad and softcap is not None:
                cap_grad = 1.0 - (z / softcap).square()  # d(cap·tanh(l/cap))/dl
            m = z.amax(-1, keepdim=True)
            e = z.sub_(m).exp_()  # z is consumed: e = exp(z - max)
            s = e.sum(-1, keepdim=True)
            lse = (m + s.log()).squeeze(-1)
            kl[r0:r1] = neg_entropy - pz + lse
            if need_grad:
                assert grad is not None  # allocated when need_grad
                g = e.div_(s).sub_(p)  # q - p
                if cap_grad is not None:
                    g.mul_(cap_grad)
                if scale != 1.0:
                    g.mul_(scale)
                g = g.view(-1, g.shape[-1])
                if weight.dtype == torch.float32:
                    torch.mm(g, weight, out=grad[r0:r1].view(-1, H))
                else:
                    if workspace is None:
                        g_low = g.to(weight.dtype)
                    else:
                        g_low = workspace.get("g_low", g.shape[0], g.shape[1], g.device,
                                              weight.dtype).copy_(g)
                    grad[r0:r1] = (g_low @ weight).view(r1 - r0, C, H).float()
            del z, e
        ctx.save_for_backward(grad)
        ctx.x_dtype = x.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("UnembedKL was run without need_grad; cannot backpropagate")
        grad_x = (grad * grad_kl[..., None]).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None, None, None, None, None


def _rows_per_block(C: int, V: int, block_bytes: int) -> int:
    return max(1, block_bytes // max(1, C * V * 4))


def fused_kl_loss_backward(
    lenses: Mapping[str, Lens],
    hs: Tensor,
    final_h: Tensor,
    unembed: Unembed,
    *,
    scale: float = 1.0,
    token_chunk: int = 2048,
    backward: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    block_bytes: int | None = None,
    workspace: Workspace | None = None,
    readout: Readout | None = None,
) -> dict[str, Tensor]:
    """Drop-in for `loss.kl_loss_backward`: accumulates gradients of mean-over-tokens,
    sum-over-layers KL for each lens; returns per-lens per-layer mean KL [L] (fp32, nats).

    hs: [L, N, H] hidden states entering blocks 0..L-1; final_h: [N, H] pre-norm final
    residual. All lenses and layers of a token chunk go through one UnembedKL call and one
    backward. `compute_dtype`: matmul dtype (default: the readout policy, i.e. the model
    dtype, with fp32 for half precision on a CPU without bf16 hardware). `readout`: owns
    the converted W_U and the reused buffers across calls (the training loop keeps one);
    without it the buffers live for this call only.
    """
    L, N, H = hs.shape
    names = list(lenses)
    if not names:
        return {}
    dtype = compute_dtype_for(unembed, compute_dtype)
    weight = unembed_weight(unembed, dtype, readout)
    bias = unembed.bias
    bias = None if bias is None else bias.detach()
    scale_logit, softcap = _quirks(unembed)
    V = weight.shape[0]
    if block_bytes is None:
        block_bytes = DEFAULT_BLOCK_BYTES.get(hs.device.type, DEFAULT_BLOCK_BYTES["cuda"])
    # One chunk's target (p, fp32) must fit in a block too.
    chunk = max(1, min(token_chunk, N, block_bytes // (V * 4)))
    rows = _rows_per_block(chunk, V, block_bytes)
    model_dtype = unembed.weight.dtype
    totals = torch.zeros(len(names), L, dtype=torch.float64)
    ws = workspace or (readout.workspace if readout is not None else Workspace())
    for start in range(0, N, chunk):
        sl = slice(start, min(N, start + chunk))
        p, neg_entropy, p_w = target_stats(final_h[sl], unembed, weight, bias, ws)
        h = hs[:, sl].float()
        with torch.set_grad_enabled(backward and torch.is_grad_enabled()):
            states = torch.cat([lenses[n].transform_all(h) for n in names])  # [nL*L, C, H]
            normed = unembed.norm(states.to(model_dtype))
            need_grad = normed.requires_grad
            kl = UnembedKL.apply(normed, weight, bias, p, neg_entropy, p_w, scale_logit,
                                 softcap, rows, need_grad, ws)
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


def lens_logits_by_layer(lens: Lens, hs: Tensor, unembed: Unembed, *,
                         compute_dtype: torch.dtype | str | None = None,
                         block_bytes: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """Evaluation-side fast path: yields (layer, logits [N, V] fp32) for every layer.

    hs: [L, N, H]. The lens transforms all layers at once and the final norm runs once
    on the stacked states (in the model dtype, as in `unembed`); the unembedding then
    runs over blocks of layers as one large matmul in `compute_dtype` (default: fp32 on
    CPU, the model dtype on GPU). Quirks (scale, soft-cap, bias) as in `unembed`.
    """
    dtype = compute_dtype_for(unembed, compute_dtype)
    weight = unembed_weight(unembed, dtype)
    bias = None if unembed.bias is None else unembed.bias.detach()
    scale, softcap = _quirks(unembed)
    L, N, H = hs.shape
    if block_bytes is None:
        block_bytes = DEFAULT_BLOCK_BYTES.get(hs.device.type, DEFAULT_BLOCK_BYTES["cuda"])
    per_block = _rows_per_block(N, weight.shape[0], block_bytes)
    normed = unembed.norm(lens.transform_all(hs.float()).to(unembed.weight.dtype))
    for l0 in range(0, L, per_block):
        l1 = min(L, l0 + per_block)
        x = normed[l0:l1].reshape(-1, H).to(dtype)
        logits = _logits(x, weight, bias, scale, softcap).view(l1 - l0, N, -1)
        for i in range(l1 - l0):
            yield l0 + i, logits[i]
