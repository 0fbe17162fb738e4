"""The one readout: hidden states -> per-layer logits, log-probs and lens metrics.

Every consumer (training loss, `evaluate`, transfer, shortcuts, trajectories, depth,
early-exit evaluation, benchmarks) goes through a `Readout`, so "KL at layer l" means
the same number whichever command printed it.

    hs [L, N, H] -> lens.transform_all (fp32) -> final norm (model dtype)
      -> x W_Uᵀ in the compute dtype (fp32 accumulation) -> quirks (bias, scale, soft-cap)
      -> fp32 softmax and metrics

Dtype policy: matmuls run in the model's dtype (bf16 on a GPU or on a CPU with bf16
hardware, where `--dtype auto` picks it; fp32 otherwise, since emulated bf16 is slower
than fp32). Softmax, KL, entropy, CE and every reduction run in fp32 and sum in fp64.
A bf16 matmul on CPU can only write bf16, so its logits are rounded to bf16 (as the
model's own bf16 lm_head output is) before they are widened.

A `Readout` owns its converted W_U and its reusable [rows, V] buffers: a fresh 100 MB
tensor costs a page fault per 4 KiB, and reusing one buffer per role keeps resident
memory flat. One Readout per thread of use; it is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lensforge.lenses.base import Lens

if TYPE_CHECKING:
    from lensforge.models.adapter import Unembed

# Rows of logits per block. 256 rows keep a CPU GEMM at the machine's rate; on a GPU a
# bigger block amortizes launches. Memory per block: rows x V x 4 bytes per buffer.
DEFAULT_BLOCK_ROWS = {"cpu": 256, "cuda": 8192}
# Top-k of the lens distribution kept by the fused metrics (precision@5 needs 5).
TOP_K = 5
# Segment length for the exact top-k by segment maxima (see `_topk_by_segments`).
_SEGMENT = 64


def fast_cpu_bf16() -> bool:
    """True when this CPU has bf16 matmul hardware (AVX-512 BF16 or AMX)."""
    from lensforge.models.loading import fast_cpu_bf16 as probe

    return probe()


def compute_dtype_for(unembed: Unembed, requested: torch.dtype | str | None = None
                      ) -> torch.dtype:
    """Matmul dtype: `requested`, else the model's dtype, except that half precision on a
    CPU without bf16 hardware (emulated, 2-4x slower than fp32) computes in fp32."""
    if isinstance(requested, str):
        requested = None if requested == "auto" else getattr(torch, requested)
    if requested is not None:
        return requested
    weight = unembed.weight
    if weight.device.type == "cpu":
        if weight.dtype == torch.bfloat16 and fast_cpu_bf16():
            return torch.bfloat16
        return torch.float32
    return weight.dtype


def quirks(unembed: Unembed) -> tuple[float, float | None]:
    """(logit scale, soft-cap or None) of a model's unembedding."""
    return float(getattr(unembed, "logit_scale", 1.0)), getattr(unembed, "softcap", None)


class Workspace:
    """Reusable [rows, cols] buffers, one per role, grown as needed."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, role: str, rows: int, cols: int, device: torch.device,
            dtype: torch.dtype = torch.float32) -> Tensor:
        """A contiguous [rows, cols] view of the `role` buffer."""
        buf = self._bufs.get(role)
        if (buf is None or buf.device != device or buf.dtype != dtype or buf.shape[1] != cols
                or buf.shape[0] < rows):
            self._bufs.pop(role, None)
            buf = torch.empty(rows, cols, dtype=dtype, device=device)
            self._bufs[role] = buf
        return buf[:rows]

    def clear(self) -> None:
        self._bufs.clear()


@dataclass
class Target:
    """The model's own distribution over one token chunk, shared by every layer and lens.

    p [C, V] and logp [C, V] live in the readout's workspace (valid until the next
    `target` call). neg_entropy Σ p log p [C]; p_w = p W_U [C, H] (None with a soft-cap,
    where Σ p z is not linear in x); top [C, k] ids of the k most likely tokens."""

    p: Tensor
    logp: Tensor
    neg_entropy: Tensor
    p_w: Tensor | None
    p_bias: Tensor | None
    top: Tensor


@dataclass
class RowMetrics:
    """Per-row lens metrics [R, C] (fp32, nats): KL(p ‖ q), H(q), CE of the next token
    (NaN where there is none), precision@1, precision@5, −log p(argmax q)."""

    kl: Tensor
    entropy: Tensor
    ce: Tensor
    p1: Tensor
    p5: Tensor
    surprisal: Tensor


class Readout:
    """Hidden states -> per-layer logits / log-probs / metrics for one model.

    unembed: the adapter's `Unembed` (final norm, W_U, bias, scale, soft-cap).
    compute_dtype: matmul dtype (default: `compute_dtype_for`).
    block_rows: rows of [rows, V] logits per matmul (default per device type).
    """

    def __init__(self, unembed: Unembed, *, compute_dtype: torch.dtype | str | None = None,
                 block_rows: int | None = None) -> None:
        self.unembed = unembed
        self.dtype = compute_dtype_for(unembed, compute_dtype)
        self.model_dtype = unembed.weight.dtype
        self.scale, self.softcap = quirks(unembed)
        self.workspace = Workspace()
        self._weight: Tensor | None = None
        self._weight_key: tuple | None = None
        device = unembed.weight.device
        self.block_rows = block_rows or DEFAULT_BLOCK_ROWS.get(device.type,
                                                               DEFAULT_BLOCK_ROWS["cuda"])

    # ------------------------------------------------------------------ parts
    @property
    def weight(self) -> Tensor:
        """W_U [V, H] in the compute dtype (converted once; redone if W_U is edited)."""
        w = self.unembed.weight.detach()
        if w.dtype == self.dtype:
            return w
        key = (w.data_ptr(), w._version, w.device)
        if self._weight is None or self._weight_key != key:
            self._weight, self._weight_key = w.to(self.dtype).contiguous(), key
        return self._weight

    @property
    def bias(self) -> Tensor | None:
        b = self.unembed.bias
        return None if b is None else b.detach()

    @property
    def vocab(self) -> int:
        return self.unembed.weight.shape[0]

    def norm(self, states: Tensor) -> Tensor:
        """Final norm in the model dtype (as the model applies it), autograd-friendly."""
        return self.unembed.norm(states.to(self.model_dtype))

    def lens_states(self, lens: Lens, hs: Tensor) -> Tensor:
        """hs [L, ..., H] -> normed lens states [L, ..., H] (model dtype)."""
        return self.norm(lens.transform_all(hs.float()))

    def logits(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x [M, H] normed -> fp32 logits [M, V] with quirks, written into `out` if given."""
        weight = self.weight
        x = x.to(self.dtype)
        M, V = x.shape[0], weight.shape[0]
        if out is None:
            out = torch.empty(M, V, dtype=torch.float32, device=x.device)
        if self.dtype == torch.float32:
            torch.mm(x, weight.T, out=out)
        else:
            low = self.workspace.get("z_low", M, V, x.device, self.dtype)
            torch.mm(x, weight.T, out=low)
            out.copy_(low)
        if self.bias is not None:
            out += self.bias.float()
        if self.scale != 1.0:
            out *= self.scale
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    # ----------------------------------------------------------------- target
    @torch.no_grad()
    def target(self, final_h: Tensor) -> Target:
        """final_h [C, H] pre-norm final residual -> the model's distribution (fp32)."""
        x = self.norm(final_h.reshape(-1, final_h.shape[-1])).to(self.dtype)
        C, V = x.shape[0], self.vocab
        z = self.logits(x, out=self.workspace.get("final_z", C, V, x.device))
        m = z.amax(-1, keepdim=True)
        z.sub_(m)
        p = torch.exp(z, out=self.workspace.get("p", C, V, x.device))
        log_s = p.sum(-1, keepdim=True).log_()
        p.div_(log_s.exp())
        logp = z.sub_(log_s)  # z is now log p
        neg_entropy = _rowdot(p, logp)
        top = _topk_by_segments(logp, min(TOP_K, V))
        p_w = p_bias = None
        if self.softcap is None:
            p_w = p @ self.weight.float() if self.dtype != torch.float32 else p @ self.weight
            p_bias = None if self.bias is None else p @ self.bias.float()
        return Target(p, logp, neg_entropy, p_w, p_bias, top)

    # ---------------------------------------------------------------- metrics
    @torch.no_grad()
    def metrics(self, x: Tensor, target: Target, next_ids: Tensor | None = None) -> RowMetrics:
        """Fused, exact per-row metrics of lens states against the target.

        x: [R, C, H] normed lens states (R = layers, C tokens of `target`); next_ids:
        [C] next-token ids (< 0 = none). One pass over each block of logits computes the
        log-partition, KL, entropy, CE, top-1/top-5 and surprisal together; no [R, C, V]
        tensor is kept.
        """
        R, C, H = x.shape
        V = self.vocab
        out = {name: torch.empty(R, C, dtype=torch.float32, device=x.device)
               for name in RowMetrics.__dataclass_fields__}
        k = min(TOP_K, V)
        rows_per = max(1, self.block_rows // C)
        ids = None if next_ids is None else next_ids.to(x.device).reshape(C)
        valid = None if ids is None else ids >= 0
        for r0 in range(0, R, rows_per):
            r1 = min(R, r0 + rows_per)
            n = r1 - r0
            xb = x[r0:r1].reshape(-1, H).to(self.dtype)
            z = self.logits(xb, out=self.workspace.get("z", n * C, V, x.device))
            if target.p_w is not None:
                # Σ_v p z = scale·(x·(p W_U) + p·b): no pass over V.
                pz = (xb.float().view(n, C, H) * target.p_w).sum(-1)
                if target.p_bias is not None:
                    pz += target.p_bias
                pz *= self.scale
            else:
                pz = _rowdot(z.view(n, C, V), target.p.expand(n, C, V)).view(n, C)
            top = _topk_by_segments(z, k)  # [n*C, k]
            m = z.gather(1, top[:, :1])
            z.sub_(m)  # z' = z - max
            e = torch.exp(z, out=self.workspace.get("e", n * C, V, x.device))
            s = e.sum(-1)
            log_s = s.log()
            ez = e.mul_(z).sum(-1)  # Σ e z'
            lse = (m.squeeze(1) + log_s).view(n, C)
            out["kl"][r0:r1] = target.neg_entropy - pz + lse
            out["entropy"][r0:r1] = (log_s - ez / s).view(n, C)
            if ids is not None:
                safe = ids.clamp(min=0).repeat(n)[:, None]
                ce = (log_s - z.gather(1, safe).squeeze(1)).view(n, C)
                assert valid is not None  # set with ids
                out["ce"][r0:r1] = torch.where(valid, ce, torch.nan)
            else:
                out["ce"][r0:r1] = torch.nan
            top = top.view(n, C, k)
            out["p1"][r0:r1] = (top[..., 0] == target.top[:, 0]).float()
            overlap = (top[..., :, None] == target.top[:, None, :k]).sum((-2, -1))
            out["p5"][r0:r1] = overlap.float() / k
            lp_top1 = target.logp.gather(1, top[..., 0].T).T  # [n, C]
            out["surprisal"][r0:r1] = -lp_top1
        return RowMetrics(**out)

    # ------------------------------------------------------------- log-probs
    @torch.no_grad()
    def layer_logprobs(self, lens: Lens, hs: Tensor) -> Iterator[tuple[int, Tensor]]:
        """hs [L, ..., H] -> (layer, fp32 log-probs [..., V]) for every layer.

        For consumers that need whole distributions (trajectories, early-exit records);
        each yielded tensor is fresh and owned by the caller.
        """
        lead = hs.shape[1:-1]
        x = self.lens_states(lens, hs).reshape(hs.shape[0], -1, hs.shape[-1])
        for layer in range(hs.shape[0]):
            yield layer, torch.log_softmax(self.logits(x[layer]), dim=-1).view(*lead, -1)

    @torch.no_grad()
    def final_logprobs(self, final_h: Tensor) -> Tensor:
        """final_h [..., H] pre-norm final residual -> the model's fp32 log-probs [..., V]."""
        lead = final_h.shape[:-1]
        x = self.norm(final_h.reshape(-1, final_h.shape[-1]))
        return torch.log_softmax(self.logits(x), dim=-1).view(*lead, -1)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a b over the last axis (rows of equal shape), without a V-wide temporary."""
    lead = a.shape[:-1]
    a2, b2 = a.reshape(-1, 1, a.shape[-1]), b.reshape(-1, b.shape[-1], 1)
    return torch.bmm(a2, b2).view(lead)


def _topk_by_segments(z: Tensor, k: int) -> Tensor:
    """Indices [M, k] of the k largest entries of each row of z [M, V], in order.

    Exact: every one of a row's k largest entries lies in a segment whose maximum is at
    least the k-th largest value, and at most k segments are such, so the k segments
    with the largest maxima hold them all. One cheap max pass over V replaces a V-wide
    top-k (which is ~30x slower per element on CPU). Ties may be broken differently
    from `torch.topk`.
    """
    M, V = z.shape
    if V < k * _SEGMENT * 4 or V % _SEGMENT:
        return z.topk(k, dim=-1).indices
    seg_max = z.view(M, V // _SEGMENT, _SEGMENT).amax(-1)  # [M, S]
    segs = seg_max.topk(k, dim=-1).indices  # [M, k]
    cols = (segs[..., None] * _SEGMENT + torch.arange(_SEGMENT, device=z.device)).view(M, -1)
    cand = z.gather(1, cols)  # [M, k * SEGMENT]
    best = cand.topk(k, dim=-1).indices
    return cols.gather(1, best)
