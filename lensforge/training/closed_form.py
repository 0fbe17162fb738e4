"""Closed-form lens initialization from streamed second moments.

For each layer fit delta_l(h) = h W + b to the residual still to come, y = h_L - h_l,
by ridge least squares; for a LoRA-Lens take the best rank-r map (reduced-rank
regression: project W onto the top-r principal directions of the fitted values).
One pass over the data, no unembedding cost; KL fine-tuning then starts from here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lensforge.errors import DataError, NonFiniteError
from lensforge.lenses.base import Lens
from lensforge.lenses.kinds import LogitLens, LowRankLens, TunedLens


class MomentAccumulator:
    """Streams sums of x, y, x xᵀ and x yᵀ per layer in fp64 (x = h_l, y = h_L − h_l)."""

    def __init__(self, n_layers: int, hidden_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        L, H = n_layers, hidden_size
        self.n = 0
        self.sum_x = torch.zeros(L, H, device=device, dtype=dtype)
        self.sum_y = torch.zeros(L, H, device=device, dtype=dtype)
        self.xx = torch.zeros(L, H, H, device=device, dtype=dtype)
        self.xy = torch.zeros(L, H, H, device=device, dtype=dtype)

    def update(self, hs: Tensor, final_h: Tensor) -> None:
        """hs: [L, N, H] hidden states of layers 0..L-1; final_h: [N, H]."""
        x = hs.to(self.xx.dtype)
        y = final_h.to(self.xx.dtype)[None] - x
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise NonFiniteError("NaN/Inf in hidden states during the closed-form pass")
        self.n += x.shape[1]
        self.sum_x += x.sum(1)
        self.sum_y += y.sum(1)
        self.xx += torch.bmm(x.transpose(1, 2), x)
        self.xy += torch.bmm(x.transpose(1, 2), y)

    def solve(self, ridge: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
        """Centered ridge solution per layer: W [L, H, H] (x @ W), b [L, H], and Cxx."""
        if self.n < 2:
            raise DataError("closed-form init needs at least 2 tokens of statistics")
        n = self.n
        mx, my = self.sum_x / n, self.sum_y / n
        cxx = self.xx / n - mx[:, :, None] * mx[:, None, :]
        cxy = self.xy / n - mx[:, :, None] * my[:, None, :]
        H = cxx.shape[-1]
        eye = torch.eye(H, dtype=cxx.dtype, device=cxx.device)
        # Ridge scaled to each layer's mean variance, so one value suits every layer.
        lam = ridge * cxx.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
        w = torch.linalg.solve(cxx + lam[:, None, None] * eye, cxy)
        b = my - torch.einsum("lh,lhk->lk", mx, w)
        return w, b, cxx


def reduced_rank(w: Tensor, cxx: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation of each ridge map in the fitted-value metric.

    Returns (down [L, r, H], up [L, H, r]) with x @ W_r = (x @ downᵀ) @ upᵀ.
    """
    fitted_cov = w.transpose(1, 2) @ cxx @ w  # covariance of the fitted values
    _, vecs = torch.linalg.eigh(fitted_cov)
    v_r = vecs[..., -rank:].flip(-1)  # top-r eigenvectors, [L, H, r]
    down = (w @ v_r).transpose(1, 2)
    return down, v_r


@torch.no_grad()
def closed_form_init(
    lenses: Iterable[Lens],
    moments: MomentAccumulator,
    *,
    ridge: float = 1e-3,
) -> None:
    """Set each tuned / low-rank lens to its least-squares solution, in place."""
    lenses = [lens for lens in lenses if not isinstance(lens, LogitLens)]
    if not lenses:
        return
    w, b, cxx = moments.solve(ridge)
    mx = moments.sum_x / moments.n
    for lens in lenses:
        if isinstance(lens, TunedLens):
            lens.weight.copy_(w.transpose(1, 2).to(lens.weight))
            if lens.bias is not None:
                lens.bias.copy_(b.to(lens.bias))
        elif isinstance(lens, LowRankLens):
            down, up = reduced_rank(w, cxx, lens.rank)
            lens.down.copy_(down.to(lens.down))
            lens.up.copy_(up.to(lens.up))
            if lens.bias is not None:
                my = moments.sum_y / moments.n
                w_r = down.transpose(1, 2) @ up.transpose(1, 2)
                lens.bias.copy_((my - torch.einsum("lh,lhk->lk", mx, w_r)).to(lens.bias))
        else:
            raise TypeError(f"closed-form init does not know lens type {type(lens).__name__}")
